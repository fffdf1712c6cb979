//! Progress over the whole sweep: a bar on a terminal (indicatif) with each result printed
//! above it, plain lines on stderr otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

use super::report::{self, Run};

/// Progress over the whole sweep: a bar on a terminal, plain lines otherwise.
pub(super) struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: Mutex<u64>,
}

impl Progress {
    pub(super) fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} (eta {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            total,
            done: Mutex::new(0),
        }
    }

    pub(super) fn say(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("compare: {text}")),
            None => eprintln!("compare: {text}"),
        }
    }

    pub(super) fn start_run(&self, name: &str, conns: usize, size: u64, round: u32, repeat: u32) {
        if let Some(bar) = &self.bar {
            bar.set_message(run_label(name, conns, size, round, repeat));
        }
    }

    pub(super) fn finish_run(
        &self,
        name: &str,
        conns: usize,
        size: u64,
        round: u32,
        repeat: u32,
        run: &Run,
    ) {
        let done = {
            let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
            *done += 1;
            *done
        };
        let mut text = format!(
            "[{done}/{}] {}:",
            self.total,
            run_label(name, conns, size, round, repeat)
        );
        if let Some(f) = &run.figures {
            text.push_str(&format!(
                " {:.0} round trips/s, p99 {:.0} µs",
                f.round_trips_per_sec, f.latency_us.p99
            ));
        }
        if let Some(failure) = &run.failure {
            text.push_str(&format!(" FAILED: {failure}"));
        }
        match &self.bar {
            Some(bar) => {
                bar.println(format!("compare: {text}"));
                bar.inc(1);
            }
            None => eprintln!("compare: {text}"),
        }
    }

    pub(super) fn skip(&self, runs: u64) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) += runs;
        if let Some(bar) = &self.bar {
            bar.inc(runs);
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `epoll: 50 conns, 64 B`, with ` (run 2/3)` when points are run more than once.
fn run_label(name: &str, conns: usize, size: u64, round: u32, repeat: u32) -> String {
    let of = if repeat > 1 {
        format!(" (run {round}/{repeat})")
    } else {
        String::new()
    };
    format!(
        "{name}: {}, {}{of}",
        report::conns_label(conns),
        report::size_label(size)
    )
}
