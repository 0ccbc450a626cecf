//! The command line: [`Cli`] and its [`Command`]s. Each command's flags are
//! defined beside its code (`sources::SourcesArgs`, `restore::RestoreArgs`, ...);
//! the doc comments here are the commands' help and manual text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::admin::ConnArgs;
use crate::alerts::AlertsArgs;
use crate::export::{ExportArgs, MountArgs};
use crate::groups::GroupCommand;
use crate::nodes::{DrainArgs, RebalanceArgs};
use crate::output::ListArgs;
use crate::pki::PkiCommand;
use crate::points::{PointsArgs, VerifyArgs};
use crate::policy::{LockArgs, QuotaArgs, RemoveArgs, RetentionArgs};
use crate::restore::RestoreArgs;
use crate::revocation::RevokeArgs;
use crate::sources::{AllocateArgs, SourcesArgs};
use crate::sync::{CheckArgs, SyncArgs};
use crate::tokens::TokenCommand;
use crate::workers::WorkersArgs;

/// Bulwark admin CLI: manage the fleet's certificates, look at nodes, agents, data
/// sources and recovery points, and run syncs and restores.
///
/// Connection to the coordinator comes from --coordinator/--ca/--cert/--key or the
/// BULWARK_COORDINATOR/BULWARK_CA/BULWARK_CERT/BULWARK_KEY variables; the
/// certificate must have the admin role (`bulwark pki issue --role admin`).
#[derive(Parser, Debug)]
#[command(name = "bulwark", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Make the fleet CA and sign certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// One screen on the whole fleet: nodes, space, data sources by state, groups,
    /// open alerts.
    Status(ListArgs),
    /// List storage nodes with their space.
    Nodes(ListArgs),
    /// List agents and whether they are connected.
    Agents(ListArgs),
    /// List data sources, where they live and their newest point.
    Sources(SourcesArgs),
    /// Sync a data source now.
    Sync(SyncArgs),
    /// Run a consistency check: compare every block of the source with the node's
    /// checksums, send only the blocks that differ, and make a new point.
    Check(CheckArgs),
    /// List the recovery points of a data source, oldest first.
    Points(PointsArgs),
    /// Restore a recovery point to a path on an agent's host.
    Restore(RestoreArgs),
    /// Set a data source's space on its node: replica space and recovery-point
    /// space (e.g. `--points 20GiB`). Takes effect at once on the node (and at the
    /// source's next sync at the latest).
    Allocate(AllocateArgs),
    /// Set an agent's quota (largest source, total space), or list quotas.
    Quota(QuotaArgs),
    /// Set a data source's retention: the admin's floor, which its agent's config
    /// can only lengthen (`--clear` goes back to the group's or the fleet minimum).
    Retention(RetentionArgs),
    /// Lock a data source's (or a group's) recovery points against pruning and
    /// deletion for a minimum age: governance (an officer certificate may lift
    /// it) or compliance (nobody can; it can only be lengthened).
    Lock(LockArgs),
    /// Stop protecting a data source and delete its points on its node (refused
    /// while any point is locked).
    Remove(RemoveArgs),
    /// List alerts: open ones, and with --all the resolved ones too.
    Alerts(AlertsArgs),
    /// Capacity forecast: per data source (recovery-point space against its
    /// allocation), group, node and pool disk, the space used, the limit, the
    /// growth per day (a trend over the coordinator's forecast_window that one-off
    /// spikes do not sway) and the days until full; `-` where there is no trend.
    Forecast(ListArgs),
    /// Re-read a data source's stored data on its node and check every checksum;
    /// damaged replica blocks are repaired from the agent when it still has them,
    /// and points that stay damaged are marked. Exits 1 when damage remains.
    Verify(VerifyArgs),
    /// Copy a recovery point from its storage node to a local file on this machine,
    /// checking every block's checksum.
    Export(ExportArgs),
    /// Export a recovery point read-only over NBD (TLS, admin certificate) from its
    /// storage node, for `qemu-img convert` or the kernel NBD client and `mount -o
    /// ro`. Prints the URL to use.
    Mount(MountArgs),
    /// Protection groups: a sync schedule and retention shared by data sources.
    #[command(subcommand)]
    Group(GroupCommand),
    /// One-time enrollment tokens (the coordinator needs an [enrollment] table).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Revoke every certificate of ROLE NAME issued up to now: its connections are
    /// refused and its open streams cut within one heartbeat interval, it cannot
    /// renew, and its old enrollment tokens stop working. A certificate issued for
    /// the name later (a token made from now on) is accepted again.
    Revoke(RevokeArgs),
    /// List revoked identities: role, name, when, by whom, serials in the CRL.
    Revocations(ListArgs),
    /// List the coordinator's (or with --node, a storage node's) background
    /// workers: state, period, runs, last run and last error.
    Workers(WorkersArgs),
    /// Move every data source off a node (it gets no new ones from now on); waits
    /// until the moves are done. Each move copies replica and points node to node,
    /// verifies every checksum, then switches the source with a new epoch.
    Drain(DrainArgs),
    /// Move data sources until node fill ratios are within the coordinator's
    /// rebalance_spread_percent of each other, moving as few bytes as it can.
    Rebalance(RebalanceArgs),
    /// Print a shell completion script (`bulwark completions bash > /etc/bash_completion.d/bulwark`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (bulwark.1 and one per command) into DIR, or print
    /// bulwark.1 to standard output.
    Man {
        /// Directory for bulwark.1, bulwark-sync.1, ...
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run a whole fleet on this machine, protect a sample volume, restore it, and
    /// clean up.
    Demo {
        /// Keep the demo's directory instead of deleting it.
        #[arg(long)]
        keep: bool,
    },
}
