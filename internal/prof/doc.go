// Package prof lets mtcp's commands write a CPU profile when the
// MTCP_CPUPROFILE environment variable names a directory, so that the
// daemons and example servers of a benchmark run can be profiled where
// they run (inside the testbed's namespaces) without a network listener.
//
// It is pure Go (runtime/pprof) and needs no privileges beyond writing to
// the directory.
package prof
