//go:build !race

package testenv

// Race is whether the test binary was built with the race detector: the
// guest freeze tests run in the suite's -race -short pass (and only there).
const Race = false
