//! Prints the ChatService CustomResourceDefinition as YAML; `crds/chatservice.yaml` is its output.

fn main() {
    print!("{}", chat_operator::crd::crd_yaml());
}
