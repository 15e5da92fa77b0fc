// Package sanityrun runs csi-sanity (github.com/kubernetes-csi/csi-test)
// from a Go test: one Ginkgo suite per test binary, with any number of
// configurations, and a log of why specs were skipped. The host test
// (package csi) and the VM test (vm/kerneltest) share it.
package sanityrun

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/ginkgo/v2/types"
	"github.com/onsi/gomega"
)

// Config is one csi-sanity configuration under a name.
type Config struct {
	Name   string
	Config *sanity.TestConfig
}

// Run registers csi-sanity once per configuration and runs the suite.
// Specs whose text contains one of skip do not run (the reason is the
// caller's to log). Why the others were skipped (the driver lacks a
// capability, mostly) is logged, with counts, and the summary line.
func Run(t *testing.T, title string, skip []string, cfgs ...Config) {
	for _, c := range cfgs {
		ginkgo.Describe(c.Name, func() { sanity.GinkgoTest(c.Config) })
	}
	reasons := map[string]int{}
	var summary string
	ginkgo.ReportAfterSuite("skip reasons", func(r ginkgo.Report) {
		var passed, failed, skipped, pending int
		for _, s := range r.SpecReports {
			if s.LeafNodeType != types.NodeTypeIt {
				continue
			}
			switch s.State {
			case types.SpecStatePassed:
				passed++
			case types.SpecStatePending:
				pending++
			case types.SpecStateSkipped:
				skipped++
				why := s.Failure.Message
				if why == "" {
					why = "filtered out (" + strings.Join(skip, ", ") + ")"
				}
				reasons[why]++
			default:
				failed++
			}
		}
		summary = fmt.Sprintf("csi-sanity: %d passed, %d failed, %d skipped, %d pending", passed, failed, skipped, pending)
	})
	gomega.RegisterFailHandler(ginkgo.Fail)
	suite, rep := ginkgo.GinkgoConfiguration()
	rep.NoColor = true
	suite.SkipStrings = append(suite.SkipStrings, skip...)
	if suite.Timeout == 0 || suite.Timeout > 8*time.Minute {
		suite.Timeout = 8 * time.Minute
	}
	ginkgo.RunSpecs(t, title, suite, rep)
	var keys []string
	for k := range reasons {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		t.Logf("skipped %3d: %s", reasons[k], k)
	}
	t.Log(summary)
}
