package daemon

import "github.com/prometheus/client_golang/prometheus"

var (
	processMigrations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mtcp_process_migrations_total",
		Help: "Process migrations (CRIU) started here, by result (moved, aborted, unconfirmed: the commit went unanswered, and the migration is ended in the background).",
	}, []string{"result"})
	processPhaseSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "mtcp_process_migration_phase_seconds",
		Help:    "How long each phase of a process migration took (prepare, hold, freeze, dump, transfer, restore, switch, pages, commit; eager migrations have no pages phase, lazy ones no freeze phase).",
		Buckets: prometheus.ExponentialBuckets(100e-6, 2, 18),
	}, []string{"phase"})
	processPauseSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "mtcp_process_migration_pause_seconds",
		Help:    "How long a migrated process's connections were held, from the hold to the end of the switch.",
		Buckets: prometheus.ExponentialBuckets(1e-3, 1.5, 20),
	})
)

func init() {
	registry.MustRegister(processMigrations, processPhaseSeconds, processPauseSeconds)
}
