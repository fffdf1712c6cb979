//! What a server costs, read from /proc: CPU time and resident memory of a process together
//! with all its descendants (the fork-based models serve from children).
//!
//! CPU time counts each live process's utime+stime plus its cutime+cstime, the time of the
//! children it has already reaped, so a connection process that came and went during the
//! measured window is still counted (by its parent) after it is gone.

use std::collections::HashMap;
use std::fs;

/// One process's line in /proc/PID/stat, the fields we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    ppid: i32,
    /// utime + stime + cutime + cstime, in clock ticks.
    cpu_ticks: u64,
}

/// Parses /proc/PID/stat text. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted from its last ')'.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // Fields from 3 on: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    // cmajflt utime stime cutime cstime ...
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    let cpu_ticks = ticks(11)? + ticks(12)? + ticks(13)? + ticks(14)?;
    Some(Stat { ppid, cpu_ticks })
}

fn read_stat(pid: i32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `root` and every live process below it.
fn tree(root: i32) -> Vec<i32> {
    tree_from_children_files(root).unwrap_or_else(|| tree_from_full_scan(root))
}

/// The children of `pid` from /proc/PID/task/TID/children (cheap, but only on kernels
/// built with CONFIG_PROC_CHILDREN); `None` where that file does not exist.
fn children_of(pid: i32) -> Option<Vec<i32>> {
    let mut children = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Some(children); // it just exited
    };
    for task in tasks.flatten() {
        match fs::read_to_string(task.path().join("children")) {
            Ok(list) => children.extend(
                list.split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && task.path().exists() => {
                return None
            }
            Err(_) => {} // the thread exited
        }
    }
    Some(children)
}

fn tree_from_children_files(root: i32) -> Option<Vec<i32>> {
    let mut all = vec![root];
    let mut next = 0;
    while next < all.len() {
        let children = children_of(all[next])?;
        all.extend(children);
        next += 1;
    }
    Some(all)
}

/// The same from the parent of every process on the machine (slower).
fn tree_from_full_scan(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some(stat) = read_stat(pid) {
                children.entry(stat.ppid).or_default().push(pid);
            }
        }
    }
    let mut all = vec![root];
    let mut next = 0;
    while next < all.len() {
        if let Some(kids) = children.get(&all[next]) {
            all.extend(kids);
        }
        next += 1;
    }
    all
}

/// The machine's CPU time so far, from the first line of /proc/stat: all of it, and the part
/// the hypervisor gave to other guests while this one wanted to run (steal), in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineTime {
    pub total: u64,
    pub steal: u64,
}

/// Parses the `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal (guest
/// time is already in user). Kernels before 2.6.11 have no steal field: `None`.
fn parse_machine_time(text: &str) -> Option<MachineTime> {
    let line = text.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    (fields.len() == 8).then(|| MachineTime {
        total: fields.iter().sum(),
        steal: fields[7],
    })
}

/// The machine's CPU time so far (`None` without /proc/stat).
pub fn machine_time() -> Option<MachineTime> {
    parse_machine_time(&fs::read_to_string("/proc/stat").ok()?)
}

/// The share of the machine's CPU time stolen between two readings, in percent.
pub fn steal_percent(before: MachineTime, after: MachineTime) -> Option<f64> {
    let total = after.total.checked_sub(before.total).filter(|&t| t > 0)?;
    let steal = after.steal.saturating_sub(before.steal);
    Some(steal as f64 * 100.0 / total as f64)
}

/// Seconds per clock tick, the unit of /proc/PID/stat times.
fn seconds_per_tick() -> f64 {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK);
    1.0 / match ticks {
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        _ => 100.0,
    }
}

/// CPU seconds used so far by `root` and its descendants (live and reaped), or `None` when
/// `root` is gone.
pub fn cpu_seconds(root: i32) -> Option<f64> {
    read_stat(root)?;
    let ticks: u64 = tree(root)
        .into_iter()
        .filter_map(read_stat)
        .map(|stat| stat.cpu_ticks)
        .sum();
    Some(ticks as f64 * seconds_per_tick())
}

/// Parses the VmRSS line of /proc/PID/status, in KiB.
fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory of `root` and its live descendants together, in KiB, or `None` when
/// `root` is gone.
pub fn rss_kib(root: i32) -> Option<u64> {
    let own = fs::read_to_string(format!("/proc/{root}/status")).ok()?;
    let others: u64 = tree(root)
        .into_iter()
        .skip(1)
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| parse_vm_rss_kib(&status))
        .sum();
    Some(parse_vm_rss_kib(&own).unwrap_or(0) + others)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let line = "1234 (my (odd) name) S 77 1234 1234 0 -1 4194560 100 0 0 0 \
                    11 22 33 44 20 0 1 0 5 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                ppid: 77,
                cpu_ticks: 11 + 22 + 33 + 44
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn machine_time_counts_steal_against_the_whole() {
        let text = "cpu  100 5 50 800 10 3 2 30 7 0\ncpu0 50 2 25 400 5 1 1 15 3 0\n";
        let before = parse_machine_time(text).unwrap();
        assert_eq!(
            before,
            MachineTime {
                total: 1000,
                steal: 30
            }
        );
        let after = MachineTime {
            total: 1200,
            steal: 80,
        };
        assert_eq!(steal_percent(before, after), Some(25.0));
        assert_eq!(steal_percent(before, before), None, "no time passed");
        assert_eq!(
            parse_machine_time("cpu  1 2 3 4 5 6 7\n"),
            None,
            "no steal field"
        );
        assert_eq!(parse_machine_time("intr 5\n"), None);
        assert!(machine_time().is_some(), "this machine has /proc/stat");
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id() as i32;
        assert!(cpu_seconds(me).is_some());
        assert!(rss_kib(me).unwrap() > 0);
        assert_eq!(
            parse_vm_rss_kib("Name:\tx\nVmRSS:\t  1234 kB\n"),
            Some(1234)
        );
    }

    #[test]
    fn finds_descendants_both_ways() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 5 & sleep 5 & wait"])
            .spawn()
            .expect("start sh");
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut scanned = tree_from_full_scan(pid);
        while scanned.len() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            scanned = tree_from_full_scan(pid);
        }
        let fast = tree_from_children_files(pid);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(scanned.len(), 3, "{scanned:?}");
        if let Some(mut fast) = fast {
            fast.sort_unstable();
            scanned.sort_unstable();
            assert_eq!(fast, scanned);
        }
    }
}
