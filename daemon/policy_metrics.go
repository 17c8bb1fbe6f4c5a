package daemon

import "github.com/prometheus/client_golang/prometheus"

// The policy engine's metrics, on the same endpoint as the migration
// metrics (metrics.go). Every decision is counted, including those that
// held back ("cooldown", "no_target", ...): the reason label is one of
// policy's Reason constants.
var (
	policyDecisions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mtcp_policy_decisions_total",
		Help: "Decisions of the policy engine, by rule (empty for peer events), reason (triggered, not_triggered, pending, cooldown, rate_limit, no_target, nothing_to_move, peer_down, peer_up) and whether it was a dry run.",
	}, []string{"rule", "reason", "dry_run"})
	policyMigrations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mtcp_policy_migrations_total",
		Help: "Connections the policy engine decided to move, by rule, trigger (the conditions that fired) and result (moved, failed, dry_run).",
	}, []string{"rule", "trigger", "result"})
	policyReloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mtcp_policy_reloads_total",
		Help: "Policy file loads, by cause (start, change, sighup) and result (ok, error).",
	}, []string{"cause", "result"})
	policyOK = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "mtcp_policy_reload_ok",
		Help: "1 when the policy running is the policy file's current content; 0 when the last reload failed and the previous policy still runs.",
	})
	policyMoving = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "mtcp_policy_moving",
		Help: "Connections the policy engine is moving now (its last decision's moves, under way); it decides again once they have ended.",
	})
	connsOwned = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "mtcp_connections_owned",
		Help: "Connections this server serves now.",
	})
	heldPackets = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "mtcp_held_packets",
		Help: "Client packets held (queued) here while their flows migrate.",
	})
	loadGauge = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "mtcp_load",
		Help: "This server's load as the policy engine sees it, by metric (cpu, run_queue, memory, memory_pressure), in the scope of the configuration's load.scope.",
	}, []string{"metric"})
	peerUp = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "mtcp_peer_up",
		Help: "1 while the peer answers its heartbeats, 0 once it missed the policy's peers.missed of them.",
	}, []string{"peer"})
)

func init() {
	registry.MustRegister(policyDecisions, policyMigrations, policyReloads, policyOK, policyMoving, connsOwned, heldPackets, loadGauge, peerUp)
}
