package bench

import (
	"fmt"
	"math"
	"slices"
	"testing"
)

// medianInterval is a sample's median with a distribution-free confidence
// interval for it, built from order statistics: with n samples, the
// population median lies between the k-th smallest and the k-th largest with
// probability 1 − 2·P(Binomial(n, ½) < k), whatever the distribution.
type medianInterval struct {
	Median, Low, High float64
	// LowRank and HighRank are the 1-based ranks of Low and High in the
	// sorted sample; Coverage is the exact coverage they give.
	LowRank, HighRank int
	Coverage          float64
	// OK is false when the sample is too small for the level asked (fewer
	// than 6 samples for 95%).
	OK bool
}

// medianCI takes the narrowest order-statistic interval whose coverage is
// at least level.
func medianCI(sample []float64, level float64) medianInterval {
	s := slices.Clone(sample)
	slices.Sort(s)
	n := len(s)
	var out medianInterval
	if n == 0 {
		return out
	}
	if n%2 == 1 {
		out.Median = s[n/2]
	} else {
		out.Median = (s[n/2-1] + s[n/2]) / 2
	}
	// below is P(B < k) for B ~ Binomial(n, ½), grown one term at a time.
	below := 0.0
	for k := 1; k <= n/2; k++ {
		below += binomialHalf(n, k-1)
		coverage := 1 - 2*below
		if coverage < level {
			break
		}
		out.LowRank, out.HighRank, out.Coverage, out.OK = k, n-k+1, coverage, true
	}
	if out.OK {
		out.Low, out.High = s[out.LowRank-1], s[out.HighRank-1]
	}
	return out
}

// binomialHalf is P(B = i) for B ~ Binomial(n, ½), through logarithms so
// that large n neither overflows nor underflows.
func binomialHalf(n, i int) float64 {
	lg := func(x int) float64 { v, _ := math.Lgamma(float64(x + 1)); return v }
	return math.Exp(lg(n) - lg(i) - lg(n-i) - float64(n)*math.Ln2)
}

// ratioCI formats a median ratio and its interval, "0.998 [0.990, 1.006]".
func (m medianInterval) ratioCI() string {
	if !m.OK {
		return fmt.Sprintf("%.3f [too few rounds for a CI]", m.Median)
	}
	return fmt.Sprintf("%.3f [%.3f, %.3f]", m.Median, m.Low, m.High)
}

func TestMedianCIRanks(t *testing.T) {
	for _, c := range []struct {
		n, low, high int
		coverage     float64
	}{
		{6, 1, 6, 0.96875},
		{10, 2, 9, 0.978515625},
		{36, 12, 25, 0.97118328},
		{40, 14, 27, 0.96152269},
	} {
		sample := make([]float64, c.n)
		for i := range sample {
			sample[i] = float64(c.n - i) // reversed: medianCI sorts
		}
		got := medianCI(sample, 0.95)
		if !got.OK || got.LowRank != c.low || got.HighRank != c.high || math.Abs(got.Coverage-c.coverage) > 1e-6 {
			t.Errorf("n=%d: ranks %d..%d coverage %.8f ok=%v, want %d..%d coverage %.8f",
				c.n, got.LowRank, got.HighRank, got.Coverage, got.OK, c.low, c.high, c.coverage)
		}
		if got.Low != float64(c.low) || got.High != float64(c.high) {
			t.Errorf("n=%d: interval [%v, %v], want [%d, %d]", c.n, got.Low, got.High, c.low, c.high)
		}
	}
	if got := medianCI([]float64{1, 2, 3, 4, 5}, 0.95); got.OK || got.Median != 3 {
		t.Errorf("n=5: %+v, want a median of 3 and no interval (best coverage is 93.75%%)", got)
	}
}
