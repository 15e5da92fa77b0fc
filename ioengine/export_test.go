package ioengine_test

import "unsafe"

func uintptrOf(p []byte) uintptr { return uintptr(unsafe.Pointer(&p[0])) }
