//! The agent's, the storage node's and the coordinator's TOML configuration of
//! arbitrary bytes, through their loaders (`AgentConfig::load`,
//! `NodeConfig::load`, `CoordinatorConfig::load`: TOML, then every check): an
//! operator's typo must be an error naming the key, never a panic. The first
//! byte chooses the loader (modulo 3: agent, node, coordinator), the rest is the
//! file.
#![no_main]

use bulwark_fuzz::scratch_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, toml)) = data.split_first() else {
        return;
    };
    let path = scratch_file("config.toml", toml);
    match which % 3 {
        0 => drop(bulwark_agent::config::AgentConfig::load(&path)),
        1 => drop(bulwark_node::config::NodeConfig::load(&path)),
        _ => drop(bulwark_coordinator::config::CoordinatorConfig::load(&path)),
    }
});
