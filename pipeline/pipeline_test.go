package pipeline

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"
)

func TestErrno(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want syscall.Errno
	}{
		{nil, 0},
		{ErrOutOfRange, syscall.EINVAL},
		{fmt.Errorf("read: %w", ErrMisaligned), syscall.EINVAL},
		{ErrTooLarge, syscall.EOVERFLOW},
		{ErrReadOnly, syscall.EPERM},
		{ErrNotSupported, syscall.EOPNOTSUPP},
		{ErrNoSpace, syscall.ENOSPC},
		{syscall.EDQUOT, syscall.ENOSPC},
		{fmt.Errorf("pwrite: %w", syscall.ENOSPC), syscall.ENOSPC},
		{context.Canceled, syscall.ESHUTDOWN},
		{syscall.EBADF, syscall.EIO},
		{errors.New("disk on fire"), syscall.EIO},
	} {
		if got := Errno(tc.err); got != tc.want {
			t.Errorf("Errno(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestChainOrder(t *testing.T) {
	var trace []string
	stage := func(name string) Stage {
		return func(next Handler) Handler {
			return HandlerFunc(func(ctx context.Context, r *Request) error {
				trace = append(trace, name)
				return next.Handle(ctx, r)
			})
		}
	}
	last := HandlerFunc(func(context.Context, *Request) error { trace = append(trace, "engine"); return nil })
	h := Chain(last, stage("qos"), stage("profile"))
	if err := h.Handle(context.Background(), &Request{Op: OpFlush}); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(trace) != "[qos profile engine]" {
		t.Fatalf("stages ran as %v, want [qos profile engine]", trace)
	}
}

func TestOpString(t *testing.T) {
	if OpWriteZeroes.String() != "write_zeroes" || Op(200).String() != "op(200)" {
		t.Fatal(OpWriteZeroes.String(), Op(200).String())
	}
}
