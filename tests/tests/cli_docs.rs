//! Shell completions and manual pages come from the CLI's own definitions, so they
//! list every command the CLI has.

use bulwark_tests::fleet::cli_plain;

#[test]
fn completions_and_man_pages_cover_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = cli_plain(&["completions", shell]);
        let text = String::from_utf8_lossy(&out.stdout);
        for cmd in [
            "sync",
            "restore",
            "drain",
            "rebalance",
            "group",
            "verify",
            "mount",
        ] {
            assert!(text.contains(cmd), "{shell} completions lack {cmd}");
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    cli_plain(&["man", "--dir", &d]);
    for page in [
        "bulwark.1",
        "bulwark-drain.1",
        "bulwark-export.1",
        "bulwark-group-create.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("no {page}: {e}"));
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    let out = cli_plain(&["man"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(".TH bulwark 1"));
}
