package daemon

import (
	"errors"
	"net/http"
	"time"

	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

var (
	registry = prometheus.NewRegistry()

	migrations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mtcp_migrations_total",
		Help: "Connections a migration moved or failed to move, by result (moved, failed) and the phase that failed.",
	}, []string{"result", "phase"})
	phaseSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "mtcp_migration_phase_seconds",
		Help:    "How long each phase of a migration transaction took.",
		Buckets: prometheus.ExponentialBuckets(50e-6, 2, 18),
	}, []string{"phase"})
	transactionSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "mtcp_migration_seconds",
		Help:    "How long a whole migration transaction took.",
		Buckets: prometheus.ExponentialBuckets(100e-6, 2, 18),
	})
)

func init() {
	registry.MustRegister(migrations, phaseSeconds, transactionSeconds,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
}

func metricsHandler() http.Handler {
	return promhttp.HandlerFor(registry, promhttp.HandlerOpts{})
}

// observe records a transaction in the metrics.
func observe(rep *migrate.Report, took time.Duration) {
	if rep == nil {
		return
	}
	transactionSeconds.Observe(took.Seconds())
	for p, t := range rep.Timings {
		phaseSeconds.WithLabelValues(string(p)).Observe(t.Seconds())
	}
	migrations.WithLabelValues("moved", "").Add(float64(len(rep.Moved)))
	// Each failed connection under the phase it failed in: a
	// transaction's error names one phase, its connections may have
	// failed in several.
	byPhase := map[string]int{}
	for _, ferr := range rep.Failed {
		phase := "partial"
		var pe *migrate.PhaseError
		if errors.As(ferr, &pe) {
			phase = string(pe.Phase)
		}
		byPhase[phase]++
	}
	for phase, n := range byPhase {
		migrations.WithLabelValues("failed", phase).Add(float64(n))
	}
}
