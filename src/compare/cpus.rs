//! CPU lists (`0,1`, `0-3`, `0-1,6`) and pinning a child process to one before it runs, so a
//! comparison can keep the server and the load generator off each other's cores.

use std::fmt;
use std::io;
use std::process::Command;

/// A set of CPU numbers, sorted and without duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    /// The CPU numbers, ascending.
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    /// Makes `command`'s process run only on these CPUs (set between fork and exec, so the
    /// process and every thread or child it starts inherit it).
    pub fn pin(&self, command: &mut Command) {
        use nix::sched::{sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        use std::os::unix::process::CommandExt;
        let mut set = CpuSet::new();
        for &cpu in &self.0 {
            set.set(cpu)
                .expect("a CPU below CPU_SETSIZE (checked by parse_cpu_list)");
        }
        // SAFETY: the closure runs in the forked child before exec; it only makes the
        // sched_setaffinity system call on a set built before the fork (async-signal-safe, no
        // allocation, no locks).
        unsafe {
            command.pre_exec(move || {
                sched_setaffinity(Pid::from_raw(0), &set).map_err(io::Error::from)
            });
        }
    }
}

impl fmt::Display for CpuList {
    /// The canonical spelling: ranges of three or more CPUs as `a-b`, the rest listed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end += 1;
            }
            match end - start {
                0 => parts.push(start.to_string()),
                1 => parts.push(format!("{start},{end}")),
                _ => parts.push(format!("{start}-{end}")),
            }
            i += 1;
        }
        f.write_str(&parts.join(","))
    }
}

/// Parses a CPU list as `taskset -c` takes it: numbers and ranges separated by commas.
pub fn parse_cpu_list(text: &str) -> Result<CpuList, String> {
    let max = libc::CPU_SETSIZE as usize;
    let number = |part: &str| -> Result<usize, String> {
        let cpu: usize = part.trim().parse().map_err(|_| {
            format!(
                "invalid CPU list '{text}': '{part}' is not a CPU number (examples: 0, 0,1, 0-3)"
            )
        })?;
        if cpu >= max {
            return Err(format!(
                "invalid CPU list '{text}': CPU {cpu} is beyond the largest possible ({})",
                max - 1
            ));
        }
        Ok(cpu)
    };
    let mut cpus = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (number(first)?, number(last)?);
                if first > last {
                    return Err(format!(
                        "invalid CPU list '{text}': range '{part}' runs backwards"
                    ));
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(number(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(CpuList(cpus))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numbers_and_ranges() {
        assert_eq!(parse_cpu_list("0").unwrap().cpus(), [0]);
        assert_eq!(parse_cpu_list("0,1").unwrap().cpus(), [0, 1]);
        assert_eq!(parse_cpu_list("0-1").unwrap().cpus(), [0, 1]);
        assert_eq!(parse_cpu_list("6,0-2, 4").unwrap().cpus(), [0, 1, 2, 4, 6]);
        assert_eq!(parse_cpu_list("1,1,0-1").unwrap().cpus(), [0, 1]);
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["", "a", "1-", "-1", "3-1", "0,,1", "1.5", "99999"] {
            let err = parse_cpu_list(bad).unwrap_err();
            assert!(err.starts_with("invalid CPU list"), "{bad}: {err}");
        }
    }

    #[test]
    fn displays_canonically() {
        let list = parse_cpu_list("7,0-3,5,6,9").unwrap();
        assert_eq!(list.to_string(), "0-3,5-7,9");
        assert_eq!(parse_cpu_list("0,1").unwrap().to_string(), "0,1");
        assert_eq!(parse_cpu_list("4").unwrap().to_string(), "4");
    }

    #[test]
    fn pinned_child_runs_only_there() {
        let list = parse_cpu_list("0").unwrap();
        let mut command = Command::new("sh");
        command.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
        list.pin(&mut command);
        let output = command.output().expect("run sh");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.trim_end().ends_with("\t0"), "{text}");
    }
}
