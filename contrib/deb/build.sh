#!/usr/bin/env bash
# Builds the Debian package: the dist binary (release, stripped), then its man pages (one per
# subcommand) and shell completions generated from the clap definitions by the binary itself,
# then `cargo deb --no-build` ([package.metadata.deb] in Cargo.toml). Prints the .deb's path.
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --profile dist --locked >&2
bin=target/dist/multiecho
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$bin" man --out-dir "$assets/man"
gzip -9n "$assets"/man/*.1
"$bin" completions bash > "$assets/completions/multiecho"
"$bin" completions zsh > "$assets/completions/_multiecho"
"$bin" completions fish > "$assets/completions/multiecho.fish"
deb=target/debian/multiecho.deb
cargo deb --no-build --locked --output "$deb" >&2
echo "$deb"
