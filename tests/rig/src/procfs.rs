//! Readings from Linux's `/proc` that the benches report beside their figures: a process's
//! resident set size now and at its peak (`VmRSS`, `VmHWM` in `/proc/<pid>/status`), the CPU time
//! it used (`/proc/<pid>/stat`), and the machine's load average. A process that has exited reads
//! as `None`.

/// Resident set size now (`VmRSS`), in bytes.
pub fn current(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS").map(|kib| kib * 1024)
}

/// The highest resident set size the process has had (`VmHWM`), in bytes.
pub fn peak(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM").map(|kib| kib * 1024)
}

/// User plus system CPU seconds the process has used.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_seconds_of(&text, clock_ticks_per_second())
}

/// Bytes as MiB, the unit the reports use.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), "?" when unreadable: how busy the
/// shared machine was while a figure was taken.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "?".into())
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field_kib(&text, key)
}

fn status_field_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

fn cpu_seconds_of(stat: &str, ticks_per_second: f64) -> Option<f64> {
    // The command name is in parentheses and may hold spaces: fields count from after it, where
    // utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / ticks_per_second)
}

/// `USER_HZ`: 100 on every Linux this runs on (it is fixed in the kernel's ABI for /proc).
fn clock_ticks_per_second() -> f64 {
    100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_resident_set_no_larger_than_its_peak() {
        let pid = std::process::id();
        let (now, peak) = (current(pid).unwrap(), peak(pid).unwrap());
        assert!(now > 0 && now <= peak, "{now} > {peak}");
        assert!(cpu_seconds(pid).is_some());
    }

    #[test]
    fn a_process_that_is_gone_reads_as_none() {
        assert_eq!(current(u32::MAX), None);
        assert_eq!(cpu_seconds(u32::MAX), None);
    }

    #[test]
    fn status_and_stat_fields_are_read_by_name_and_position() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_field_kib(status, "VmRSS"), Some(1024));
        assert_eq!(status_field_kib(status, "VmSwap"), None);
        let stat = "42 (a (b) c) S 1 1 1 0 -1 0 0 0 0 0 250 50 0 0 20 0";
        assert_eq!(cpu_seconds_of(stat, 100.0), Some(3.0));
    }
}
