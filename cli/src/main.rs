//! `bulwark`: the admin CLI (see `bulwark --help`).

use std::process::ExitCode;

use bulwark_cli::{Cli, run};
use bulwark_common::telemetry::{self, LogFormat};
use clap::{CommandFactory, FromArgMatches};
use tracing::Instrument;

fn main() -> ExitCode {
    bulwark_common::malloc::tune();
    let matches = Cli::command().get_matches();
    let command = matches.subcommand_name().unwrap_or_default().to_string();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulwark: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    // With OTEL_EXPORTER_OTLP_ENDPOINT set, each command is the root of a trace that
    // follows it through the coordinator, the agent and the node.
    let tel = {
        let _rt = rt.enter();
        telemetry::init(
            LogFormat::Text,
            "warn",
            "bulwark",
            telemetry::otlp_endpoint(None),
        )
    };
    let span = tracing::info_span!("cli", otel.name = %format!("bulwark {command}"), otel.kind = "client", trace_id = tracing::field::Empty);
    telemetry::record_trace_id(&span);
    let result = rt.block_on(run(cli).instrument(span));
    {
        let _rt = rt.enter();
        tel.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message may carry an agent's or node's words: escaped, line by
            // line.
            let text = format!("{e:#}");
            let lines: Vec<String> = text.lines().map(bulwark_common::text::escape).collect();
            eprintln!("bulwark: {}", lines.join("\n"));
            ExitCode::FAILURE
        }
    }
}
