//! bf16 products on AMX (Intel's Advanced Matrix Extensions): the same operands and sums as the
//! `vdpbf16ps` kernel (both rounded to bf16, products summed in f32), on the tile unit, which
//! multiplies a 16x32 by a 32x16 bf16 block in one instruction.
//!
//! Written with `asm!` because Rust's AMX intrinsics are not stable. Linux hands the tile state
//! to a process only after `arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked once in [`available`].
//!
//! The driver follows `gemm.rs`'s blocking and reads the operands through the same packers and
//! stored panels; it then lays them out as the tiles load them: B's bf16 pair panels are already
//! the tile layout (16 pair rows of 16 columns, 64 bytes each), A's panels are turned into rows
//! of pairs (a row's depth contiguous). Each call of the micro-kernel computes a 32x32 block of
//! C in four accumulator tiles (two A tiles by two B tiles, eight tiles in all).

use super::gemm::{as_tiles, block, block_depth, to_pairs, PackA, PackB, MR, NC, NR, TILE as T};

/// Rows of C one micro-kernel call computes (two A tiles), and columns (two B panels).
const TILE_M: usize = 2 * T;
/// Rows of one A block (a multiple of the tile rows and of the panel height `MR`): 192 rows of
/// up to 256 pairs are 192 KiB, kept in L2 while the B panels stream.
const MC: usize = 192;

/// Whether the CPU has AMX-BF16 and the kernel let this process use the tiles (asked once).
pub fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            use std::arch::x86_64::__cpuid_count;
            // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let edx = __cpuid_count(7, 0).edx;
            if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 || !is_x86_feature_detected!("avx512bf16") {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a request for a permission; it changes nothing else in the process.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

thread_local! {
    /// Packing buffers: A in f32 and as pairs, one B panel in f32, B as tiles, A as rows of pairs
    /// and as tiles.
    #[allow(clippy::type_complexity)]
    static BUFS: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new())) };
}

/// One thread's share of `C (+)= A·B` in bf16 products: rows `i_base..i_base+m`, columns
/// `j_base..j_base+n` (as `gemm.rs`'s serial driver).
///
/// # Safety
/// [`available`] returned true; `c` points at C's element (0, 0) and no other thread writes
/// this block.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    i_base: usize,
    j_base: usize,
    a: &dyn PackA,
    b: &dyn PackB,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    BUFS.with(|bufs| {
        let (ref mut af, ref mut bf, ref mut ap, ref mut bpad, ref mut arows, ref mut atiles) = *bufs.borrow_mut();
        let kb = block_depth(k, true);
        let nc_max = NC.min(n.div_ceil(NR) * NR);
        let mc_max = MC.min(m.div_ceil(MR) * MR);
        // Depth in pairs, padded to whole tiles (16 pairs); the padding is zeros on both sides.
        let kq_max = kb.div_ceil(2).div_ceil(T);
        let grow = |v: &mut Vec<u32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0)
            }
        };
        if bf.len() < NR * kb {
            bf.resize(NR * kb, 0.0);
        }
        if af.len() < mc_max * kb {
            af.resize(mc_max * kb, 0.0);
        }
        grow(ap, mc_max * kb.div_ceil(2));
        grow(bpad, nc_max * kq_max * T);
        grow(arows, mc_max.div_ceil(TILE_M) * TILE_M * kq_max * T);
        grow(atiles, mc_max.div_ceil(TILE_M) * TILE_M * kq_max * T);
        configure_tiles();
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let jb = j_base + jc;
            for pc in (0..k).step_by(kb) {
                let kc = kb.min(k - pc);
                let kc2 = kc.div_ceil(2);
                let kq = kc2.div_ceil(T);
                let stride = kq * T;
                let panels = nc.div_ceil(NR);
                let bt: *const u32 = match b.packed_pairs(pc, kc, jb) {
                    // Stored pairs already in tile layout when the depth is whole tiles.
                    Some(p) if kc2 == stride => p.as_ptr(),
                    Some(p) => {
                        for (dst, src) in bpad.chunks_exact_mut(stride * NR).zip(p.chunks_exact(kc2 * NR)).take(panels)
                        {
                            dst[..kc2 * NR].copy_from_slice(src);
                            dst[kc2 * NR..].fill(0);
                        }
                        bpad.as_ptr()
                    }
                    // Panel by panel through an f32 buffer that stays in L1, rounded into place:
                    // one pass over memory (the products are fast enough for packing to count).
                    None => {
                        for (panel, dst) in bpad.chunks_exact_mut(stride * NR).take(panels).enumerate() {
                            let j0 = jb + panel * NR;
                            b.pack_b(pc, kc, j0, NR.min(jb + nc - j0), &mut bf[..kc * NR]);
                            to_pairs(&bf[..kc * NR], kc, NR, &mut dst[..kc2 * NR]);
                            dst[kc2 * NR..].fill(0);
                        }
                        bpad.as_ptr()
                    }
                };
                let acc = accumulate || pc > 0;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let ib = i_base + ic;
                    let rows_padded = mc.div_ceil(TILE_M) * TILE_M;
                    let a_tiles: *const u32 = match a.tiles(ib, pc, kc) {
                        Some(t) => t.as_ptr(),
                        None => {
                            let rows = &mut arows[..rows_padded * stride];
                            if a.packed_pairs(ib, pc, kc).is_some() || !a.bf16_rows(ib, mc, pc, kc, stride, rows) {
                                let apairs = block(
                                    true,
                                    a.packed_pairs(ib, pc, kc),
                                    a.packed(ib, pc, kc),
                                    kc,
                                    MR,
                                    mc,
                                    af,
                                    ap,
                                    |d| a.pack_a(ib, mc, pc, kc, d),
                                )
                                .cast::<u32>();
                                let apairs = std::slice::from_raw_parts(apairs, mc.div_ceil(MR) * MR * kc2);
                                rows_of_pairs(apairs, mc, kc2, stride, rows);
                            } else {
                                rows[mc * stride..].fill(0);
                            }
                            as_tiles(rows, stride, &mut atiles[..rows_padded * stride]);
                            atiles.as_ptr()
                        }
                    };
                    for jr in (0..nc).step_by(2 * NR) {
                        let nr = (2 * NR).min(nc - jr);
                        let b0 = bt.add(jr * stride);
                        // A single last panel: its tile read twice, the second half discarded.
                        let b1 = if nr > NR { b0.add(NR * stride) } else { b0 };
                        for ir in (0..mc).step_by(TILE_M) {
                            let mr = TILE_M.min(mc - ir);
                            let a0 = a_tiles.add(ir * stride);
                            let cptr = c.add((ib + ir) * ldc + jb + jr);
                            tile_32x32(kq, a0, b0, b1, cptr, ldc, acc, mr, nr);
                        }
                    }
                }
            }
        }
        release_tiles();
    })
}

/// A block's pair panels (`MR` rows each, `kc2` pairs deep: `src[panel][q][r]`) as rows of
/// pairs `stride` apart (`dst[row][q]`), zero past the depth and past the `mc` rows.
fn rows_of_pairs(src: &[u32], mc: usize, kc2: usize, stride: usize, dst: &mut [u32]) {
    for (panel, src) in src.chunks_exact(kc2 * MR).enumerate() {
        let rows = MR.min(mc.saturating_sub(panel * MR));
        for r in 0..rows {
            let row = &mut dst[(panel * MR + r) * stride..][..stride];
            for (q, v) in row[..kc2].iter_mut().enumerate() {
                *v = src[q * MR + r];
            }
            row[kc2..].fill(0);
        }
    }
    dst[mc * stride..].fill(0);
}

/// The tile shapes every call uses: eight tiles of 16 rows by 64 bytes (palette 1).
#[inline]
pub(super) unsafe fn configure_tiles() {
    #[repr(C, align(64))]
    struct Config([u8; 64]);
    let mut cfg = Config([0; 64]);
    cfg.0[0] = 1;
    for t in 0..8 {
        cfg.0[16 + 2 * t] = 64;
        cfg.0[48 + t] = T as u8;
    }
    std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
}

/// Gives the tile state back (so a context switch need not save it).
#[inline]
pub(super) unsafe fn release_tiles() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// `C[..mr, ..nr] (+)= A·B` for one 32x32 block over `kq` steps of 16 pairs: A as tiles from
/// `a0` (rows 0-15, `kq` tiles of 1 KiB, then rows 16-31; zero past `mr`), B tiles of 16 pair
/// rows from `b0` and `b1` (64 bytes a row, 1 KiB a step).
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) unsafe fn tile_32x32(
    kq: usize,
    a0: *const u32,
    b0: *const u32,
    b1: *const u32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    mr: usize,
    nr: usize,
) {
    use std::arch::asm;
    let full = mr == TILE_M && nr == 2 * NR;
    let cs = ldc * 4;
    let (c0, c1, c2, c3) = (c, c.add(T), c.add(T * ldc), c.add(T * ldc + T));
    if full && accumulate {
        asm!(
            "tileloadd tmm0, [{c0} + {cs}*1]",
            "tileloadd tmm1, [{c1} + {cs}*1]",
            "tileloadd tmm2, [{c2} + {cs}*1]",
            "tileloadd tmm3, [{c3} + {cs}*1]",
            c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, cs = in(reg) cs,
            options(nostack, readonly),
        );
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }
    asm!(
        "2:",
        "tileloadd tmm4, [{a0} + {bs}*1]",
        "tileloadd tmm5, [{a1} + {bs}*1]",
        "tileloadd tmm6, [{b0} + {bs}*1]",
        "tileloadd tmm7, [{b1} + {bs}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 1024",
        "add {a1}, 1024",
        "add {b0}, 1024",
        "add {b1}, 1024",
        "dec {kq}",
        "jnz 2b",
        a0 = inout(reg) a0 => _,
        a1 = inout(reg) a0.add(kq * T * T) => _,
        b0 = inout(reg) b0 => _,
        b1 = inout(reg) b1 => _,
        kq = inout(reg) kq => _,
        bs = in(reg) 64usize,
        options(nostack, readonly),
    );
    if full {
        asm!(
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c1} + {cs}*1], tmm1",
            "tilestored [{c2} + {cs}*1], tmm2",
            "tilestored [{c3} + {cs}*1], tmm3",
            c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, cs = in(reg) cs,
            options(nostack),
        );
        return;
    }
    // An edge block: through a scratch tile, then only its `mr x nr` corner into C.
    #[repr(C, align(64))]
    struct Scratch([[f32; 2 * NR]; TILE_M]);
    let mut s = Scratch([[0.0; 2 * NR]; TILE_M]);
    let p = s.0.as_mut_ptr().cast::<f32>();
    asm!(
        "tilestored [{c0} + {cs}*1], tmm0",
        "tilestored [{c1} + {cs}*1], tmm1",
        "tilestored [{c2} + {cs}*1], tmm2",
        "tilestored [{c3} + {cs}*1], tmm3",
        c0 = in(reg) p, c1 = in(reg) p.add(T), c2 = in(reg) p.add(T * 2 * NR), c3 = in(reg) p.add(T * 2 * NR + T),
        cs = in(reg) 2 * NR * 4,
        options(nostack),
    );
    for (r, row) in s.0.iter().enumerate().take(mr) {
        let out = std::slice::from_raw_parts_mut(c.add(r * ldc), nr);
        if accumulate {
            for (o, v) in out.iter_mut().zip(row) {
                *o += v;
            }
        } else {
            out.copy_from_slice(&row[..nr]);
        }
    }
}

/// `C[32 x 32] = A·B` over `steps` steps whose right tiles lie at scattered places: A as in
/// [`tile_32x32`] (rows 0-15, `steps` tiles of 1 KiB, then rows 16-31); step `s`'s two B tiles
/// at `base + offsets[s]` (in pairs) and 64 bytes on, their rows `stride` bytes apart. A 3x3
/// convolution reads its shifted input windows this way straight from the image (see
/// `amx_conv.rs`), so nothing is packed per product.
///
/// # Safety
/// Tiles configured by [`configure_tiles`]; `offsets` holds `steps` entries and every tile read
/// and the 32x32 block of C (`ldc` apart) are in bounds.
#[inline]
pub(super) unsafe fn tile_32x32_offsets(
    steps: usize,
    a0: *const u32,
    base: *const u32,
    offsets: *const isize,
    stride: usize,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::asm;
    let cs = ldc * 4;
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    asm!(
        "2:",
        "mov {t}, [{off}]",
        "lea {t}, [{base} + {t}*4]",
        "tileloadd tmm4, [{a0} + {bs}*1]",
        "tileloadd tmm5, [{a1} + {bs}*1]",
        "tileloadd tmm6, [{t} + {st}*1]",
        "tileloadd tmm7, [{t} + {st}*1 + 64]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 1024",
        "add {a1}, 1024",
        "add {off}, 8",
        "dec {n}",
        "jnz 2b",
        a0 = inout(reg) a0 => _,
        a1 = inout(reg) a0.add(steps * T * T) => _,
        off = inout(reg) offsets => _,
        n = inout(reg) steps => _,
        t = out(reg) _,
        base = in(reg) base,
        st = in(reg) stride,
        bs = in(reg) 64usize,
        options(nostack, readonly),
    );
    let (c0, c1, c2, c3) = (c, c.add(T), c.add(T * ldc), c.add(T * ldc + T));
    asm!(
        "tilestored [{c0} + {cs}*1], tmm0",
        "tilestored [{c1} + {cs}*1], tmm1",
        "tilestored [{c2} + {cs}*1], tmm2",
        "tilestored [{c3} + {cs}*1], tmm3",
        c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, cs = in(reg) cs,
        options(nostack),
    );
}

/// Whether the CPU also has AMX-INT8 (and the tiles are ours: see [`available`]).
pub fn int8_available() -> bool {
    #[cfg(target_os = "linux")]
    {
        // CPUID.(7,0):EDX bit 25 AMX-INT8.
        available() && std::arch::x86_64::__cpuid_count(7, 0).edx & (1 << 25) != 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// The tiles of the 8-bit kernel configured on this thread while alive (released on drop):
/// tmm0-1 the two 12x16 i32 halves of the tile, tmm2 12 rows of 64 bytes of the left operand,
/// tmm3-4 16 quad rows of the two right panels.
pub struct Int8Tiles(());

impl Int8Tiles {
    pub fn configure() -> Self {
        #[repr(C, align(64))]
        struct Config([u8; 64]);
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        for (t, rows) in [(0, 12u8), (1, 12), (2, 12), (3, 16), (4, 16)] {
            cfg.0[16 + 2 * t] = 64;
            cfg.0[48 + t] = rows;
        }
        // SAFETY: called on the AMX-INT8 path only (`int8_available`).
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        Int8Tiles(())
    }
}

impl Drop for Int8Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `configure` on this thread.
        unsafe { release_tiles() }
    }
}

/// The 8-bit kernel's `12 x 32` integer tile on AMX: `kqb` quads (whole groups of 16) of the
/// left panel at `a` (`[group][row][64 bytes]`) against the right panels at `b0`, `b1`
/// (`[quad][16 columns][4]`). `a_u8`: the left operand is the unsigned one (`tdpbusd`), else the
/// right one is (`tdpbsud`).
///
/// # Safety
/// [`Int8Tiles`] alive on this thread; the panels hold `kqb` quads.
pub(super) unsafe fn int8_tile(
    kqb: usize,
    a: *const u8,
    b0: *const u8,
    b1: *const u8,
    a_u8: bool,
    out: &mut [[i32; 32]; 12],
) {
    use std::arch::asm;
    debug_assert!(kqb.is_multiple_of(16) && kqb > 0);
    asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
    let steps = kqb / 16;
    // The two loops differ only in which operand the instruction reads as unsigned.
    macro_rules! steps {
        ($op:literal) => {
            asm!(
                "2:",
                "tileloadd tmm2, [{a} + {s}*1]",
                "tileloadd tmm3, [{b0} + {s}*1]",
                "tileloadd tmm4, [{b1} + {s}*1]",
                concat!($op, " tmm0, tmm2, tmm3"),
                concat!($op, " tmm1, tmm2, tmm4"),
                "add {a}, 768",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {n}",
                "jnz 2b",
                a = inout(reg) a => _, b0 = inout(reg) b0 => _, b1 = inout(reg) b1 => _, n = inout(reg) steps => _,
                s = in(reg) 64usize,
                options(nostack, readonly),
            )
        };
    }
    if a_u8 {
        steps!("tdpbusd");
    } else {
        steps!("tdpbsud");
    }
    let o = out.as_mut_ptr().cast::<i32>();
    asm!(
        "tilestored [{o0} + {s}*1], tmm0",
        "tilestored [{o1} + {s}*1], tmm1",
        o0 = in(reg) o, o1 = in(reg) o.add(16), s = in(reg) 128usize,
        options(nostack),
    );
}
