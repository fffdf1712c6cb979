//! Records which source the binary is built from, for `compare`'s reports: the git commit
//! (`MULTIECHO_COMMIT`) and whether the built sources had uncommitted changes
//! (`MULTIECHO_TREE_DIRTY`). Outside a git checkout (a crate tarball, no git) neither is set
//! and the reports say the commit was not recorded.

use std::path::Path;
use std::process::Command;

/// The files the binary is built from: a change in any of them is a dirty tree.
const BUILT_FROM: [&str; 4] = ["src", "Cargo.toml", "Cargo.lock", "build.rs"];

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn main() {
    for path in BUILT_FROM {
        println!("cargo:rerun-if-changed={path}");
    }
    let Some(commit) = git(&["rev-parse", "HEAD"]) else {
        return;
    };
    // A new commit moves HEAD or the branch it points to: run again then.
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!(
            "cargo:rerun-if-changed={}",
            Path::new(&git_dir).join("HEAD").display()
        );
    }
    if let (Some(common), Some(branch)) = (
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
        git(&["rev-parse", "--symbolic-full-name", "HEAD"]),
    ) {
        let common = Path::new(&common);
        if branch.starts_with("refs/") {
            println!("cargo:rerun-if-changed={}", common.join(&branch).display());
        }
        println!(
            "cargo:rerun-if-changed={}",
            common.join("packed-refs").display()
        );
    }
    let mut status = vec!["status", "--porcelain", "--"];
    status.extend(BUILT_FROM);
    let dirty = git(&status).map(|changes| !changes.is_empty());
    println!("cargo:rustc-env=MULTIECHO_COMMIT={commit}");
    if let Some(dirty) = dirty {
        println!("cargo:rustc-env=MULTIECHO_TREE_DIRTY={dirty}");
    }
}
