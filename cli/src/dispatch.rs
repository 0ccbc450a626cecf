//! [`run`]: one parsed command line to the module that carries it out. Commands
//! that need no coordinator (pki, completions, man, demo) run first; the rest get
//! a connected [`Admin`].

use clap::CommandFactory;

use crate::admin::Admin;
use crate::args::{Cli, Command};
use crate::{
    alerts, demo, docs, export, forecast, groups, nodes, pki, points, policy, restore, revocation,
    sources, status, sync, tokens, workers,
};

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match cli.command {
        Command::Pki(p) => return pki::run(p),
        Command::Demo { keep } => return demo::run(keep).await,
        Command::Completions { shell } => return docs::completions(Cli::command(), shell),
        Command::Man { dir } => return docs::man_pages(Cli::command(), dir.as_deref()),
        command => command,
    };
    let (coordinator, files) = cli.conn.files()?;
    let mut admin = Admin::connect(&coordinator, &files).await?;
    let admin = &mut admin;
    match command {
        Command::Status(a) => status::status(admin, a.json).await,
        Command::Nodes(a) => nodes::nodes(admin, a.json).await,
        Command::Agents(a) => nodes::agents(admin, a.json).await,
        Command::Drain(a) => nodes::drain(admin, a).await,
        Command::Rebalance(a) => nodes::rebalance(admin, a).await,
        Command::Sources(a) => sources::sources(admin, a).await,
        Command::Allocate(a) => sources::allocate(admin, a).await,
        Command::Sync(a) => sync::sync(admin, a).await,
        Command::Check(a) => sync::check(admin, a).await,
        Command::Points(a) => points::points(admin, a).await,
        Command::Verify(a) => points::verify(admin, a).await,
        Command::Restore(a) => restore::restore(admin, a).await,
        Command::Export(a) => export::export(admin, &files, a).await,
        Command::Mount(a) => export::mount(admin, &files, a).await,
        Command::Quota(a) => policy::quota(admin, a).await,
        Command::Retention(a) => policy::retention(admin, a).await,
        Command::Lock(a) => policy::lock(admin, &files, a).await,
        Command::Remove(a) => policy::remove(admin, a).await,
        Command::Alerts(a) => alerts::alerts(admin, a).await,
        Command::Forecast(a) => forecast::forecast(admin, a.json).await,
        Command::Group(g) => groups::run(admin, g).await,
        Command::Token(t) => tokens::run(admin, t).await,
        Command::Revoke(a) => revocation::revoke(admin, a).await,
        Command::Revocations(a) => revocation::list(admin, a.json).await,
        Command::Workers(a) => workers::workers(admin, &files, a).await,
        Command::Pki(_)
        | Command::Demo { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => Ok(()),
    }
}
