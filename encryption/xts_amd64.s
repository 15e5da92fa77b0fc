//go:build amd64 && !purego

#include "textflag.h"

// AES-256-XTS with AES-NI. See xts_amd64.go for the Go side and the
// layout of xtsKeys: the data key's encryption round keys at 0, its
// decryption round keys (for AESDEC, the equivalent inverse cipher) at
// 240, the tweak key's encryption round keys at 480.

// xtsPoly folds the carries of T·α: 0x87 into the low byte for the bit
// that leaves the top of the 128-bit tweak, 1 into bit 64 for the bit that
// crosses from its low quadword into its high one.
DATA xtsPoly<>+0(SB)/4, $0x00000087
DATA xtsPoly<>+4(SB)/4, $0
DATA xtsPoly<>+8(SB)/4, $1
DATA xtsPoly<>+12(SB)/4, $0
GLOBL xtsPoly<>(SB), RODATA|NOPTR, $16

// ---- key expansion ----

// The next even round key of AES-256 (FIPS-197 key expansion, four words
// at a time) into X1, from X1 (two round keys back) and X3 (the previous
// one), with round constant rcon; stored at off(BX).
#define EXPAND_EVEN(rcon, off) \
	AESKEYGENASSIST rcon, X3, X2; \
	PSHUFD          $0xff, X2, X2; \
	MOVO            X1, X4; \
	PSLLO           $4, X4; \
	PXOR            X4, X1; \
	PSLLO           $4, X4; \
	PXOR            X4, X1; \
	PSLLO           $4, X4; \
	PXOR            X4, X1; \
	PXOR            X2, X1; \
	MOVOU           X1, off(BX)

// The next odd round key into X3, from X3 and X1 (SubWord without
// RotWord or round constant); stored at off(BX).
#define EXPAND_ODD(off) \
	AESKEYGENASSIST $0x00, X1, X4; \
	PSHUFD          $0xaa, X4, X2; \
	MOVO            X3, X4; \
	PSLLO           $4, X4; \
	PXOR            X4, X3; \
	PSLLO           $4, X4; \
	PXOR            X4, X3; \
	PSLLO           $4, X4; \
	PXOR            X4, X3; \
	PXOR            X2, X3; \
	MOVOU           X3, off(BX)

// The decryption round key at to(DX): InvMixColumns of the encryption
// round key at from(BX).
#define INVERT(from, to) \
	MOVOU  from(BX), X0; \
	AESIMC X0, X0; \
	MOVOU  X0, to(DX)

// func expandKey256(key *[32]byte, enc, dec *[15][16]byte)
// dec may be nil.
TEXT ·expandKey256(SB), NOSPLIT, $0-24
	MOVQ  key+0(FP), AX
	MOVQ  enc+8(FP), BX
	MOVQ  dec+16(FP), DX
	MOVOU 0(AX), X1
	MOVOU 16(AX), X3
	MOVOU X1, 0(BX)
	MOVOU X3, 16(BX)
	EXPAND_EVEN($0x01, 32)
	EXPAND_ODD(48)
	EXPAND_EVEN($0x02, 64)
	EXPAND_ODD(80)
	EXPAND_EVEN($0x04, 96)
	EXPAND_ODD(112)
	EXPAND_EVEN($0x08, 128)
	EXPAND_ODD(144)
	EXPAND_EVEN($0x10, 160)
	EXPAND_ODD(176)
	EXPAND_EVEN($0x20, 192)
	EXPAND_ODD(208)
	EXPAND_EVEN($0x40, 224)
	TESTQ DX, DX
	JZ    done

	// The equivalent inverse cipher's keys: in reverse order, the
	// middle thirteen through InvMixColumns.
	MOVOU 224(BX), X0
	MOVOU X0, 0(DX)
	INVERT(208, 16)
	INVERT(192, 32)
	INVERT(176, 48)
	INVERT(160, 64)
	INVERT(144, 80)
	INVERT(128, 96)
	INVERT(112, 112)
	INVERT(96, 128)
	INVERT(80, 144)
	INVERT(64, 160)
	INVERT(48, 176)
	INVERT(32, 192)
	INVERT(16, 208)
	MOVOU 0(BX), X0
	MOVOU X0, 224(DX)

done:
	PXOR X1, X1
	PXOR X2, X2
	PXOR X3, X3
	PXOR X4, X4
	RET

// ---- AES-NI, 8 blocks at a time ----

// t = t·α in GF(2^128) (X10 holds xtsPoly; tmp is clobbered): each
// quadword shifted left by one, the bit out of the low quadword into the
// high one, the bit out of the top folded back as 0x87.
#define MULALPHA(t, tmp) \
	MOVO   t, tmp; \
	PSRAL  $31, tmp; \
	PADDQ  t, t; \
	PSHUFD $0x13, tmp, tmp; \
	PAND   X10, tmp; \
	PXOR   tmp, t

// X9 = AES-256 of X9 under the tweak key (at 480(AX)).
#define TWEAK0 \
	MOVOU      480(AX), X8; \
	PXOR       X8, X9; \
	MOVOU      496(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      512(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      528(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      544(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      560(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      576(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      592(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      608(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      624(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      640(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      656(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      672(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      688(AX), X8; \
	AESENC     X8, X9; \
	MOVOU      704(AX), X8; \
	AESENCLAST X8, X9

// Block i of eight: Xi = src ^ T ^ round key 0 (X12), T saved at
// 16*i(SP) for the end, T advanced.
#define LOAD(i, x) \
	MOVOU (16*i)(SI), x; \
	PXOR  X9, x; \
	MOVOU X9, (16*i)(SP); \
	PXOR  X12, x; \
	MULALPHA(X9, X11)

// One round on the eight blocks, round key at off(BX).
#define ROUND8(op, off) \
	MOVOU off(BX), X8; \
	op    X8, X0; \
	op    X8, X1; \
	op    X8, X2; \
	op    X8, X3; \
	op    X8, X4; \
	op    X8, X5; \
	op    X8, X6; \
	op    X8, X7

// Block i of eight out: Xi ^ its T, to dst.
#define STORE(i, x) \
	MOVOU (16*i)(SP), X8; \
	PXOR  X8, x; \
	MOVOU x, (16*i)(DI)

// One round on one block (X0), round key at off(BX).
#define ROUND1(op, off) \
	MOVOU off(BX), X8; \
	op    X8, X0

// The body of xtsEncAESNI and xtsDecAESNI: units data units of blocks
// 16-byte blocks each, the first with sequence number seq, from SI to DI,
// with round keys at BX (the data key's, for op and last) and 480(AX)
// (the tweak key's). Registers: X0-X7 blocks, X8 round key, X9 the
// running tweak, X10 xtsPoly, X11 scratch, X12 and X13 the first and last
// round keys; CX blocks left in the unit, DX blocks per unit, R8 seq, R9
// units left.
#define XTS_AESNI(op, last) \
	MOVOU xtsPoly<>(SB), X10; \
	MOVOU 0(BX), X12; \
	MOVOU 224(BX), X13; \
	TESTQ R9, R9; \
	JZ    done; \
unit: \
	MOVQ  R8, X9; \
	TWEAK0; \
	MOVQ  DX, CX; \
loop8: \
	CMPQ  CX, $8; \
	JB    tail; \
	LOAD(0, X0); \
	LOAD(1, X1); \
	LOAD(2, X2); \
	LOAD(3, X3); \
	LOAD(4, X4); \
	LOAD(5, X5); \
	LOAD(6, X6); \
	LOAD(7, X7); \
	ROUND8(op, 16); \
	ROUND8(op, 32); \
	ROUND8(op, 48); \
	ROUND8(op, 64); \
	ROUND8(op, 80); \
	ROUND8(op, 96); \
	ROUND8(op, 112); \
	ROUND8(op, 128); \
	ROUND8(op, 144); \
	ROUND8(op, 160); \
	ROUND8(op, 176); \
	ROUND8(op, 192); \
	ROUND8(op, 208); \
	last  X13, X0; \
	last  X13, X1; \
	last  X13, X2; \
	last  X13, X3; \
	last  X13, X4; \
	last  X13, X5; \
	last  X13, X6; \
	last  X13, X7; \
	STORE(0, X0); \
	STORE(1, X1); \
	STORE(2, X2); \
	STORE(3, X3); \
	STORE(4, X4); \
	STORE(5, X5); \
	STORE(6, X6); \
	STORE(7, X7); \
	ADDQ  $128, SI; \
	ADDQ  $128, DI; \
	SUBQ  $8, CX; \
	JMP   loop8; \
tail: \
	TESTQ CX, CX; \
	JZ    next; \
loop1: \
	MOVOU (SI), X0; \
	PXOR  X9, X0; \
	PXOR  X12, X0; \
	ROUND1(op, 16); \
	ROUND1(op, 32); \
	ROUND1(op, 48); \
	ROUND1(op, 64); \
	ROUND1(op, 80); \
	ROUND1(op, 96); \
	ROUND1(op, 112); \
	ROUND1(op, 128); \
	ROUND1(op, 144); \
	ROUND1(op, 160); \
	ROUND1(op, 176); \
	ROUND1(op, 192); \
	ROUND1(op, 208); \
	last  X13, X0; \
	PXOR  X9, X0; \
	MOVOU X0, (DI); \
	MULALPHA(X9, X11); \
	ADDQ  $16, SI; \
	ADDQ  $16, DI; \
	DECQ  CX; \
	JNZ   loop1; \
next: \
	INCQ  R8; \
	DECQ  R9; \
	JNZ   unit; \
done: \
	PXOR  X0, X0; \
	PXOR  X1, X1; \
	PXOR  X2, X2; \
	PXOR  X3, X3; \
	PXOR  X4, X4; \
	PXOR  X5, X5; \
	PXOR  X6, X6; \
	PXOR  X7, X7; \
	PXOR  X9, X9

// func xtsEncAESNI(k *xtsKeys, dst, src *byte, blocks, units int, seq uint64)
TEXT ·xtsEncAESNI(SB), NOSPLIT, $128-48
	MOVQ k+0(FP), AX
	MOVQ dst+8(FP), DI
	MOVQ src+16(FP), SI
	MOVQ blocks+24(FP), DX
	MOVQ units+32(FP), R9
	MOVQ seq+40(FP), R8
	MOVQ AX, BX
	XTS_AESNI(AESENC, AESENCLAST)
	RET

// func xtsDecAESNI(k *xtsKeys, dst, src *byte, blocks, units int, seq uint64)
TEXT ·xtsDecAESNI(SB), NOSPLIT, $128-48
	MOVQ k+0(FP), AX
	MOVQ dst+8(FP), DI
	MOVQ src+16(FP), SI
	MOVQ blocks+24(FP), DX
	MOVQ units+32(FP), R9
	MOVQ seq+40(FP), R8
	LEAQ 240(AX), BX
	XTS_AESNI(AESDEC, AESDECLAST)
	RET

// ---- VAES on 512-bit vectors (AVX-512), 32 blocks at a time ----

// Per-lane shift counts: lane i of a ZMM (both quadwords) by i bits, and
// 64 less that (VPSRLQV of 64 gives 0).
DATA xtsLaneShl<>+0(SB)/8, $0
DATA xtsLaneShl<>+8(SB)/8, $0
DATA xtsLaneShl<>+16(SB)/8, $1
DATA xtsLaneShl<>+24(SB)/8, $1
DATA xtsLaneShl<>+32(SB)/8, $2
DATA xtsLaneShl<>+40(SB)/8, $2
DATA xtsLaneShl<>+48(SB)/8, $3
DATA xtsLaneShl<>+56(SB)/8, $3
GLOBL xtsLaneShl<>(SB), RODATA|NOPTR, $64

DATA xtsLaneShr<>+0(SB)/8, $64
DATA xtsLaneShr<>+8(SB)/8, $64
DATA xtsLaneShr<>+16(SB)/8, $63
DATA xtsLaneShr<>+24(SB)/8, $63
DATA xtsLaneShr<>+32(SB)/8, $62
DATA xtsLaneShr<>+40(SB)/8, $62
DATA xtsLaneShr<>+48(SB)/8, $61
DATA xtsLaneShr<>+56(SB)/8, $61
GLOBL xtsLaneShr<>(SB), RODATA|NOPTR, $64

// dst = t·α^k in every 128-bit lane (0 < k <= 56), Z31 holding 0x87 in
// each lane's low quadword: each quadword shifted left by k, the k bits
// out of a low quadword into its high one, the k bits out of the top
// folded back by a carry-less multiply with 0x87 (at most k+8 bits, so it
// stays in the low quadword). tmp1 and tmp2 are clobbered.
#define MULALPHAK(k, t, dst, tmp1, tmp2) \
	VPSRLQ     $(64-k), t, tmp1; \
	VPSLLQ     $k, t, dst; \
	VPCLMULQDQ $0x01, Z31, tmp1, tmp2; \
	VPSLLDQ    $8, tmp1, tmp1; \
	VPTERNLOGD $0x96, tmp1, tmp2, dst

// Z0 = AES-256 of the 128-bit seq (R8) under the tweak key (at 480(AX)),
// in every lane, then multiplied by α^i in lane i; Z8-Z15 = Z0·α^(4j),
// the tweaks of the first 32 blocks of the unit.
#define VTWEAKS \
	VMOVQ          R8, X0; \
	VPXOR          480(AX), X0, X0; \
	VAESENC        496(AX), X0, X0; \
	VAESENC        512(AX), X0, X0; \
	VAESENC        528(AX), X0, X0; \
	VAESENC        544(AX), X0, X0; \
	VAESENC        560(AX), X0, X0; \
	VAESENC        576(AX), X0, X0; \
	VAESENC        592(AX), X0, X0; \
	VAESENC        608(AX), X0, X0; \
	VAESENC        624(AX), X0, X0; \
	VAESENC        640(AX), X0, X0; \
	VAESENC        656(AX), X0, X0; \
	VAESENC        672(AX), X0, X0; \
	VAESENC        688(AX), X0, X0; \
	VAESENCLAST    704(AX), X0, X0; \
	VSHUFI64X2     $0, Z0, Z0, Z0; \
	VPSRLVQ        xtsLaneShr<>(SB), Z0, Z1; \
	VPSLLVQ        xtsLaneShl<>(SB), Z0, Z8; \
	VPCLMULQDQ     $0x01, Z31, Z1, Z2; \
	VPSLLDQ        $8, Z1, Z1; \
	VPTERNLOGD     $0x96, Z1, Z2, Z8; \
	MULALPHAK(4, Z8, Z9, Z0, Z1); \
	MULALPHAK(8, Z8, Z10, Z2, Z3); \
	MULALPHAK(12, Z8, Z11, Z4, Z5); \
	MULALPHAK(16, Z8, Z12, Z6, Z7); \
	MULALPHAK(20, Z8, Z13, Z0, Z1); \
	MULALPHAK(24, Z8, Z14, Z2, Z3); \
	MULALPHAK(28, Z8, Z15, Z4, Z5)

// One round on the 32 blocks in Z0-Z7 with round key k.
#define VROUND(op, k) \
	op k, Z0, Z0; \
	op k, Z1, Z1; \
	op k, Z2, Z2; \
	op k, Z3, Z3; \
	op k, Z4, Z4; \
	op k, Z5, Z5; \
	op k, Z6, Z6; \
	op k, Z7, Z7

// Four blocks in: z = src ^ tweak t ^ round key 0 (Z16).
#define VLOAD(i, z, t) \
	VMOVDQU64  (64*i)(SI), z; \
	VPTERNLOGD $0x96, Z16, t, z

// Four blocks out: z ^ tweak t, to dst.
#define VSTORE(i, z, t) \
	VPXORQ    t, z, z; \
	VMOVDQU64 z, (64*i)(DI)

// The body of xtsEncVAES and xtsDecVAES, like XTS_AESNI but for units
// of a multiple of 32 blocks (DX): Z0-Z7 blocks, Z8-Z15 their tweaks,
// Z16-Z30 the data key's round keys in every lane, Z31 0x87.
#define XTS_VAES(op, last) \
	VBROADCASTI32X4 xtsPoly<>(SB), Z31; \
	VBROADCASTI32X4 0(BX), Z16; \
	VBROADCASTI32X4 16(BX), Z17; \
	VBROADCASTI32X4 32(BX), Z18; \
	VBROADCASTI32X4 48(BX), Z19; \
	VBROADCASTI32X4 64(BX), Z20; \
	VBROADCASTI32X4 80(BX), Z21; \
	VBROADCASTI32X4 96(BX), Z22; \
	VBROADCASTI32X4 112(BX), Z23; \
	VBROADCASTI32X4 128(BX), Z24; \
	VBROADCASTI32X4 144(BX), Z25; \
	VBROADCASTI32X4 160(BX), Z26; \
	VBROADCASTI32X4 176(BX), Z27; \
	VBROADCASTI32X4 192(BX), Z28; \
	VBROADCASTI32X4 208(BX), Z29; \
	VBROADCASTI32X4 224(BX), Z30; \
	TESTQ R9, R9; \
	JZ    done; \
unit: \
	VTWEAKS; \
	MOVQ  DX, CX; \
loop32: \
	VLOAD(0, Z0, Z8); \
	VLOAD(1, Z1, Z9); \
	VLOAD(2, Z2, Z10); \
	VLOAD(3, Z3, Z11); \
	VLOAD(4, Z4, Z12); \
	VLOAD(5, Z5, Z13); \
	VLOAD(6, Z6, Z14); \
	VLOAD(7, Z7, Z15); \
	VROUND(op, Z17); \
	VROUND(op, Z18); \
	VROUND(op, Z19); \
	VROUND(op, Z20); \
	VROUND(op, Z21); \
	VROUND(op, Z22); \
	VROUND(op, Z23); \
	VROUND(op, Z24); \
	VROUND(op, Z25); \
	VROUND(op, Z26); \
	VROUND(op, Z27); \
	VROUND(op, Z28); \
	VROUND(op, Z29); \
	VROUND(last, Z30); \
	VSTORE(0, Z0, Z8); \
	VSTORE(1, Z1, Z9); \
	VSTORE(2, Z2, Z10); \
	VSTORE(3, Z3, Z11); \
	VSTORE(4, Z4, Z12); \
	VSTORE(5, Z5, Z13); \
	VSTORE(6, Z6, Z14); \
	VSTORE(7, Z7, Z15); \
	ADDQ  $512, SI; \
	ADDQ  $512, DI; \
	SUBQ  $32, CX; \
	JZ    next; \
	MULALPHAK(32, Z8, Z8, Z0, Z1); \
	MULALPHAK(32, Z9, Z9, Z2, Z3); \
	MULALPHAK(32, Z10, Z10, Z4, Z5); \
	MULALPHAK(32, Z11, Z11, Z6, Z7); \
	MULALPHAK(32, Z12, Z12, Z0, Z1); \
	MULALPHAK(32, Z13, Z13, Z2, Z3); \
	MULALPHAK(32, Z14, Z14, Z4, Z5); \
	MULALPHAK(32, Z15, Z15, Z6, Z7); \
	JMP   loop32; \
next: \
	INCQ  R8; \
	DECQ  R9; \
	JNZ   unit; \
done: \
	VPXORQ Z16, Z16, Z16; \
	VPXORQ Z17, Z17, Z17; \
	VPXORQ Z18, Z18, Z18; \
	VPXORQ Z19, Z19, Z19; \
	VPXORQ Z20, Z20, Z20; \
	VPXORQ Z21, Z21, Z21; \
	VPXORQ Z22, Z22, Z22; \
	VPXORQ Z23, Z23, Z23; \
	VPXORQ Z24, Z24, Z24; \
	VPXORQ Z25, Z25, Z25; \
	VPXORQ Z26, Z26, Z26; \
	VPXORQ Z27, Z27, Z27; \
	VPXORQ Z28, Z28, Z28; \
	VPXORQ Z29, Z29, Z29; \
	VPXORQ Z30, Z30, Z30; \
	VPXORQ Z31, Z31, Z31; \
	VZEROALL

// func xtsEncVAES(k *xtsKeys, dst, src *byte, blocks, units int, seq uint64)
// blocks is a multiple of 32.
TEXT ·xtsEncVAES(SB), NOSPLIT, $0-48
	MOVQ k+0(FP), AX
	MOVQ dst+8(FP), DI
	MOVQ src+16(FP), SI
	MOVQ blocks+24(FP), DX
	MOVQ units+32(FP), R9
	MOVQ seq+40(FP), R8
	MOVQ AX, BX
	XTS_VAES(VAESENC, VAESENCLAST)
	RET

// func xtsDecVAES(k *xtsKeys, dst, src *byte, blocks, units int, seq uint64)
// blocks is a multiple of 32.
TEXT ·xtsDecVAES(SB), NOSPLIT, $0-48
	MOVQ k+0(FP), AX
	MOVQ dst+8(FP), DI
	MOVQ src+16(FP), SI
	MOVQ blocks+24(FP), DX
	MOVQ units+32(FP), R9
	MOVQ seq+40(FP), R8
	LEAQ 240(AX), BX
	XTS_VAES(VAESDEC, VAESDECLAST)
	RET
