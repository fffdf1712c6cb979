//! The `multiecho` binary: parse the command line and validate it into a plan
//! (`multiecho::cli`), set up logging, run the subcommand, and turn any error into one line
//! on stderr and a non-zero exit status.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use multiecho::cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("multiecho: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => match args.inetd {
            Some(kind) => multiecho::server::inetd::serve(kind, &args.config())
                .context("serving the --inetd connection failed"),
            None => {
                let readiness = multiecho::activation::Readiness::new(args.ready_fd)?;
                multiecho::server::run_with(args.model, &args.listen, args.config(), readiness)
                    .with_context(|| format!("the {} server failed", args.model))
            }
        },
        Command::Client(args) => multiecho::client::run(&args.config()?),
        Command::Bench(args) => multiecho::bench::run(&args.plan()?),
        Command::Compare(args) => multiecho::compare::run(&args.plan()),
        Command::Check(args) => multiecho::check::run(&args.plan()),
        Command::Merge(args) => multiecho::bench::merge::run(&args.files, args.json),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            // Generated whole first: clap_complete panics on a write error such as EPIPE.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "multiecho", &mut script);
            std::io::stdout()
                .write_all(&script)
                .context("cannot write the completions")
        }
        Command::Man {
            out_dir: Some(dir), ..
        } => write_man_pages(&dir),
        Command::Man { subcommand, .. } => {
            let mut page = Vec::new();
            man_page(subcommand.as_deref())?
                .render(&mut page)
                .context("cannot render the man page")?;
            std::io::stdout()
                .write_all(&page)
                .context("cannot write the man page")
        }
    }
}

/// Logs to stderr as text or JSON lines, synchronously (no logging thread: fork-based models fork after this).
fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let level = match (cli.quiet, cli.verbose) {
        (0, 0) => "info",
        (1, _) => "warn",
        (q, _) if q > 1 => "error",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match cli.log_format {
        LogFormat::Text => builder.with_ansi(colour_stderr()).init(),
        // One JSON object per line, the event's fields at the top level, for log shippers.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// Colour only for a person at a terminal who has not asked for none (<https://no-color.org>):
/// escape codes in a log file or a pipe are noise.
fn colour_stderr() -> bool {
    use std::io::IsTerminal;
    let no_color = matches!(std::env::var_os("NO_COLOR"), Some(v) if !v.is_empty());
    std::io::stderr().is_terminal() && !no_color
}

/// Writes multiecho.1 and multiecho-SUBCOMMAND.1 for every subcommand into `dir`.
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    let command = <Cli as clap::CommandFactory>::command();
    let names = std::iter::once(None).chain(
        command
            .get_subcommands()
            .filter(|sub| sub.get_name() != "help")
            .map(|sub| Some(sub.get_name().to_string())),
    );
    for name in names {
        let file = match &name {
            Some(name) => dir.join(format!("multiecho-{name}.1")),
            None => dir.join("multiecho.1"),
        };
        let mut page = Vec::new();
        man_page(name.as_deref())?
            .render(&mut page)
            .context("cannot render the man page")?;
        std::fs::write(&file, page).with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(())
}

/// The man page of multiecho, or of `subcommand` (named multiecho-SUBCOMMAND).
fn man_page(subcommand: Option<&str>) -> anyhow::Result<clap_mangen::Man> {
    let command = <Cli as clap::CommandFactory>::command();
    let Some(name) = subcommand else {
        return Ok(clap_mangen::Man::new(command));
    };
    let sub = command
        .find_subcommand(name)
        .with_context(|| format!("no subcommand '{name}' (see multiecho --help)"))?
        .clone();
    // clap takes only &'static str names without its `string` feature; this process prints
    // one page and exits.
    let title: &'static str = Box::leak(format!("multiecho-{name}").into_boxed_str());
    Ok(clap_mangen::Man::new(sub.name(title).bin_name(title)))
}

/// A closed stdout (`multiecho client | head -1`) is a normal way for output to end.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
