package daemon

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/lifeboat-dr/lifeboat"
)

// metrics are the site's Prometheus metrics, served at /metrics on the local API
// socket (nothing listens unauthenticated on a network; a local scraper or a
// socket proxy reads them).
type metrics struct {
	reg      *prometheus.Registry
	cycles   *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	duration *prometheus.HistogramVec
	freeze   *prometheus.HistogramVec
}

func newMetrics(d *Daemon) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		cycles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lifeboat_cycles_total", Help: "Replication cycles by VM and result (ok, error).",
		}, []string{"vm", "result"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lifeboat_bytes_total", Help: "Bytes of committed points by VM and kind (changed, zero, same, dedup, data, sent).",
		}, []string{"vm", "kind"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "lifeboat_cycle_duration_seconds", Help: "Duration of committed cycles.",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 14),
		}, []string{"vm"}),
		freeze: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "lifeboat_freeze_duration_seconds", Help: "How long guests were frozen for quiesced points.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 12),
		}, []string{"vm"}),
	}
	m.reg.MustRegister(m.cycles, m.bytes, m.duration, m.freeze, &statusCollector{d: d})
	return m
}

func (m *metrics) cycle(vm string, pt lifeboat.Point, err error) {
	if err != nil {
		m.cycles.WithLabelValues(vm, "error").Inc()
		return
	}
	m.cycles.WithLabelValues(vm, "ok").Inc()
	s := pt.Stats
	for kind, n := range map[string]int64{"changed": s.BytesChanged, "zero": s.BytesZero, "same": s.BytesSame,
		"dedup": s.BytesDedup, "data": s.BytesData, "sent": s.BytesSent} {
		m.bytes.WithLabelValues(vm, kind).Add(float64(n))
	}
	m.duration.WithLabelValues(vm).Observe(s.Duration.Seconds())
	if pt.Freeze > 0 {
		m.freeze.WithLabelValues(vm).Observe(pt.Freeze.Seconds())
	}
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// statusCollector reads the RPO and last point of every VM at scrape time.
type statusCollector struct{ d *Daemon }

var (
	rpoDesc = prometheus.NewDesc("lifeboat_rpo_seconds",
		"Age of the VM's newest committed point: the recovery point objective achieved right now.", []string{"vm", "role"}, nil)
	lastDesc   = prometheus.NewDesc("lifeboat_last_point_id", "ID of the VM's newest committed point.", []string{"vm", "role"}, nil)
	errDesc    = prometheus.NewDesc("lifeboat_vm_in_error", "1 when the VM's last cycle failed.", []string{"vm"}, nil)
	targetDesc = prometheus.NewDesc("lifeboat_rpo_target_seconds", "The VM's RPO target (rpo_target).", []string{"vm"}, nil)
	unprotDesc = prometheus.NewDesc("lifeboat_vm_unprotected",
		"1 when `lifeboat unprotect` took the VM out of protection: it has no cycles, and no RPO is reported for it.", []string{"vm"}, nil)
)

func (c *statusCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- rpoDesc
	ch <- lastDesc
	ch <- errDesc
	ch <- targetDesc
	ch <- unprotDesc
}

func (c *statusCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	for _, name := range c.d.vmNames() {
		v, _ := c.d.vmOf(name)
		s := v.status(now)
		unprotected := 0.0
		if s.State == stateUnprotected {
			unprotected = 1
		}
		ch <- prometheus.MustNewConstMetric(unprotDesc, prometheus.GaugeValue, unprotected, name)
		if s.LastPoint != nil && unprotected == 0 {
			ch <- prometheus.MustNewConstMetric(rpoDesc, prometheus.GaugeValue, s.RPO, name, s.Role)
			ch <- prometheus.MustNewConstMetric(lastDesc, prometheus.GaugeValue, float64(s.LastPoint.ID), name, s.Role)
		}
		inErr := 0.0
		if s.State == "error" {
			inErr = 1
		}
		ch <- prometheus.MustNewConstMetric(errDesc, prometheus.GaugeValue, inErr, name)
		if s.RPOTarget > 0 {
			ch <- prometheus.MustNewConstMetric(targetDesc, prometheus.GaugeValue, s.RPOTarget, name)
		}
	}
	if c.d.store == nil {
		return
	}
	names, err := c.d.store.VMs()
	if err != nil {
		return
	}
	for _, name := range names {
		if p, ok, err := c.d.store.Latest(name); err == nil && ok {
			ch <- prometheus.MustNewConstMetric(rpoDesc, prometheus.GaugeValue, p.Age(now).Seconds(), name, "replica")
			ch <- prometheus.MustNewConstMetric(lastDesc, prometheus.GaugeValue, float64(p.ID), name, "replica")
		}
	}
}
