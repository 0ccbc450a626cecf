# shellcheck shell=bash
# Shared by the bench/*.sh scripts (sourced, not run).

# Sets BIN to the directory of the release binaries: BENCH_BIN_DIR (relative to the
# current directory) if set, else builds them with cargo in ROOT (CARGO_TARGET_DIR
# honoured as by cargo). Dies, through the caller's `die`, when one is missing.
bench_binaries() {
    if [[ -n "${BENCH_BIN_DIR:-}" ]]; then
        BIN="$BENCH_BIN_DIR"
        [[ "$BIN" = /* ]] || BIN="$PWD/$BIN"
        echo "== using binaries in $BIN"
    else
        echo "== cargo build --release --bins (in $ROOT)"
        (cd "$ROOT" && cargo build --release --workspace --bins)
        BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
        [[ "$BIN" = /* ]] || BIN="$ROOT/$BIN"
    fi
    local b
    for b in bulwark bulwark-coordinator bulwark-node bulwark-agent; do
        [[ -x "$BIN/$b" ]] || die "$BIN/$b is missing"
    done
}
