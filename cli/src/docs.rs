//! `bulwark completions` and `bulwark man`: shell completions and manual pages
//! generated from the CLI's own clap definitions, so they list every command.

use std::path::Path;

use anyhow::Context;

/// `bulwark completions SHELL`: the script on standard output.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> anyhow::Result<()> {
    clap_complete::generate(shell, &mut cmd, "bulwark", &mut std::io::stdout());
    Ok(())
}

/// `bulwark man`: the manual from the clap definitions, into `dir` (one page per
/// command) or `bulwark.1` on standard output.
pub fn man_pages(cmd: clap::Command, dir: Option<&Path>) -> anyhow::Result<()> {
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("cannot write the manual pages into {}", dir.display()))?;
    Ok(())
}
