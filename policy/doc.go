// Package policy is mtcp's policy engine: the policy file (YAML) and the
// decisions it drives, when to migrate which connections and where.
//
// A policy file holds rules. A rule has a trigger (conditions on this
// server's load, on its connections' paths, on maintenance or on a time
// window) and an action (migrate a count or a fraction of the matching
// connections to a target chosen by a strategy: least_loaded, path_cost
// or weighted). Hysteresis ("clear" levels, "for" durations, target
// margins), per-rule cooldowns, a per-connection cooldown and an
// engine-wide rate limit keep connections from ping-ponging; dry_run
// logs decisions without acting. Parse reports unknown keys and bad
// values with their line numbers.
//
// The package is pure: the daemon measures (load, TCP_INFO, peer
// heartbeats) and hands the engine a Snapshot with the time in it; the
// engine returns Decisions and reads no clock, file or socket. It needs
// no privileges, and its tests are table-driven unit tests. The daemon
// (package daemon) carries the decisions out through the same migration
// entry point as mtcpctl migrate, and tests/policy_test.go exercises the
// whole loop on the network-namespace testbed.
package policy
