//! The program of the mongo stand-in image: see `chat_rig::images::mongo`.

fn main() {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_else(|| "mongod".into());
    std::process::exit(chat_rig::images::mongo::main(&argv0, args.collect()));
}
