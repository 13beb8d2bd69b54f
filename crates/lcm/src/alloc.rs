//! A global allocator that keeps a few recently freed large blocks for reuse.
//!
//! Every tensor op allocates its output, and a denoising step allocates the same large shapes
//! over and over. Large blocks come straight from the OS (`mmap`), so each one is page-faulted
//! and zeroed by the kernel again on first touch: on the 2-core bench machine that was ~14% of
//! the CPU time of a 512x512 image. Handing a freed block of the same size back instead costs
//! nothing. The cache is bounded (`CAPACITY` bytes in at most `SLOTS` blocks), so it adds at most
//! that much to peak memory; everything else goes to the system allocator unchanged.
//!
//! It also lets weight files be mapped straight into tensors ([`map_file_f32`]): a model's f32
//! weights then cost no copy and no zeroed page at load (the kernel maps the page cache), which
//! was most of a CLI run's start-up. Only this allocator knows how to free such a buffer, so the
//! mapping is used only once it has served an allocation, i.e. when it is the global allocator.
//!
//! Opt in from a binary:
//! ```no_run
//! #[global_allocator]
//! static ALLOC: lcm::alloc::CachingAllocator = lcm::alloc::CachingAllocator;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Blocks smaller than this go straight to the system allocator (which already reuses them).
const MIN_SIZE: usize = 1 << 20;
const SLOTS: usize = 48;
const CAPACITY: usize = 1 << 30;

pub struct CachingAllocator;

struct Cache {
    blocks: [(usize, usize); SLOTS], // (address, size); address 0 = empty
    bytes: usize,
}

// No allocation ever happens while this lock is held.
static CACHE: Mutex<Cache> = Mutex::new(Cache { blocks: [(0, 0); SLOTS], bytes: 0 });

/// Set when this allocator serves an allocation: it is the global allocator.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Spans smaller than this are read, not mapped (a mapping costs a system call and an entry).
const MAP_MIN: usize = 64 << 10;

/// File mappings handed out as buffers: (buffer address, mapping address, mapping length);
/// address 0 = free. A fixed table, so that freeing never allocates while its lock is held.
const MAPPINGS: usize = 8192;
static MAPPED: Mutex<[(usize, usize, usize); MAPPINGS]> = Mutex::new([(0, 0, 0); MAPPINGS]);
/// Mappings alive, so that frees skip the table while there are none.
static MAPPED_COUNT: AtomicUsize = AtomicUsize::new(0);

/// `len` bytes of `file` from `offset`, as f32 values (little-endian, as safetensors stores
/// them), in a private copy-on-write mapping of the file instead of a copy: nothing is read or
/// zeroed until a value is touched, and then the page cache's pages are mapped. `None` (read the
/// bytes instead) unless this allocator is the global one, the span is large enough to be worth a
/// mapping and f32-aligned, and the system maps it. Like diffusers' loading, this assumes nobody
/// truncates a weight file while its model is in use.
pub fn map_file_f32(file: &std::fs::File, offset: u64, len: usize) -> Option<Vec<f32>> {
    if !ACTIVE.load(Ordering::Relaxed)
        || len < MAP_MIN
        || !len.is_multiple_of(4)
        || !offset.is_multiple_of(4)
        || cfg!(target_endian = "big")
    {
        return None;
    }
    map_file(file, offset, len).map(|ptr| {
        // SAFETY: `ptr` is `len` readable and writable bytes, 4-aligned (page-aligned mapping plus
        // a multiple of 4), any bytes are a valid f32, and this allocator's `dealloc` unmaps it
        // when the Vec frees it (the table entry), whatever layout it is freed with.
        unsafe { Vec::from_raw_parts(ptr.cast::<f32>(), len / 4, len / 4) }
    })
}

#[cfg(unix)]
fn map_file(file: &std::fs::File, offset: u64, len: usize) -> Option<*mut u8> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok().filter(|p| *p > 0)?;
    let delta = (offset % page as u64) as usize;
    let map_len = len.checked_add(delta)?;
    let map_offset = libc::off_t::try_from(offset - delta as u64).ok()?;
    // SAFETY: a fresh private mapping of an open file; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            map_offset,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let ptr = (base as usize + delta) as *mut u8;
    let registered = MAPPED.lock().ok().and_then(|mut table| {
        let slot = table.iter_mut().find(|e| e.0 == 0)?;
        *slot = (ptr as usize, base as usize, map_len);
        MAPPED_COUNT.fetch_add(1, Ordering::Relaxed);
        Some(())
    });
    if registered.is_none() {
        // SAFETY: the mapping made above, never handed out.
        unsafe { libc::munmap(base, map_len) };
        return None;
    }
    Some(ptr)
}

#[cfg(not(unix))]
fn map_file(_: &std::fs::File, _: u64, _: usize) -> Option<*mut u8> {
    None
}

/// Unmap `ptr` if it is one of [`map_file_f32`]'s buffers; false if it is not.
fn unmap(ptr: *mut u8) -> bool {
    if MAPPED_COUNT.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let Ok(mut table) = MAPPED.lock() else { return false };
    let Some(entry) = table.iter_mut().find(|e| e.0 == ptr as usize) else { return false };
    let (_, base, len) = std::mem::take(entry);
    MAPPED_COUNT.fetch_sub(1, Ordering::Relaxed);
    drop(table);
    #[cfg(unix)]
    // SAFETY: the mapping registered for this buffer, freed once (its entry is cleared).
    unsafe {
        libc::munmap(base as *mut libc::c_void, len)
    };
    #[cfg(not(unix))]
    let _ = (base, len);
    true
}

/// Fresh blocks at least this large are asked to be backed by transparent huge pages.
const HUGE_MIN: usize = 4 << 20;

/// Ask Linux to back the whole 2 MiB pages inside `len` bytes at `ptr` with transparent huge
/// pages (where it is set to `madvise`, as on most distributions): a large tensor then faults
/// in 512 times less often, and kernels striding across it (AMX tile rows a plane apart) miss
/// the TLB far less. Only advice: nothing changes where it is not granted.
pub fn advise_huge(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).div_ceil(HUGE) * HUGE;
        let end = (ptr as usize).saturating_add(len) / HUGE * HUGE;
        if end > start {
            // SAFETY: advice on whole pages inside the caller's allocation; no data changes.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

impl CachingAllocator {
    fn take(layout: Layout) -> *mut u8 {
        if layout.size() < MIN_SIZE || layout.align() > 16 {
            return std::ptr::null_mut();
        }
        let Ok(mut c) = CACHE.lock() else { return std::ptr::null_mut() };
        for slot in c.blocks.iter_mut() {
            if slot.0 != 0 && slot.1 == layout.size() {
                let p = slot.0 as *mut u8;
                *slot = (0, 0);
                c.bytes -= layout.size();
                return p;
            }
        }
        std::ptr::null_mut()
    }

    /// Keep the block if there is room; false hands it back to the caller to free.
    fn keep(ptr: *mut u8, layout: Layout) -> bool {
        if layout.size() < MIN_SIZE || layout.align() > 16 {
            return false;
        }
        let Ok(mut c) = CACHE.lock() else { return false };
        if c.bytes + layout.size() > CAPACITY {
            return false;
        }
        if let Some(slot) = c.blocks.iter_mut().find(|s| s.0 == 0) {
            *slot = (ptr as usize, layout.size());
            c.bytes += layout.size();
            return true;
        }
        false
    }
}

unsafe impl GlobalAlloc for CachingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !ACTIVE.load(Ordering::Relaxed) {
            ACTIVE.store(true, Ordering::Relaxed);
        }
        let p = Self::take(layout);
        if !p.is_null() {
            return p;
        }
        let p = System.alloc(layout);
        if layout.size() >= HUGE_MIN && !p.is_null() {
            advise_huge(p, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = Self::take(layout);
        if !p.is_null() {
            // Zeroing resident memory is far cheaper than faulting in fresh zero pages.
            std::ptr::write_bytes(p, 0, layout.size());
            return p;
        }
        let p = System.alloc_zeroed(layout);
        if layout.size() >= HUGE_MIN && !p.is_null() {
            advise_huge(p, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= MAP_MIN && unmap(ptr) {
            return;
        }
        if !Self::keep(ptr, layout) {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < MIN_SIZE && new_size < MIN_SIZE {
            return System.realloc(ptr, layout, new_size);
        }
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let p = self.alloc(new_layout);
        if !p.is_null() {
            std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn maps_file_spans_and_unmaps_them_once() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..5 * 4096 + 100).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&bytes).unwrap();
        // An offset inside a page, as safetensors data offsets are.
        let (offset, len) = (4100, 3 * 4096);
        let p = map_file(&f, offset, len).unwrap();
        // SAFETY: the mapping is `len` bytes long and alive until `unmap`.
        let mapped = unsafe { std::slice::from_raw_parts(p, len) };
        assert_eq!(mapped, &bytes[offset as usize..offset as usize + len]);
        // Copy-on-write: writing changes the buffer, never the file.
        // SAFETY: as above; the mapping is writable.
        unsafe { *p = mapped[0].wrapping_add(1) };
        assert!(unmap(p), "the buffer is a registered mapping");
        assert!(!unmap(p), "and is unmapped only once");
        let mut back = vec![0u8; len];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, offset).unwrap();
        assert_eq!(back, &bytes[offset as usize..offset as usize + len]);
    }

    #[test]
    fn reuses_freed_large_blocks_and_zeroes_them() {
        // An odd size no other test allocates, so the cached block is ours.
        let layout = Layout::from_size_align(3 * MIN_SIZE + 12, 8).unwrap();
        let a = CachingAllocator;
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 0xAB, layout.size());
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(layout);
            assert_eq!(p, q, "a freed block of the same size is handed back");
            assert!(std::slice::from_raw_parts(q, layout.size()).iter().all(|&b| b == 0));
            a.dealloc(q, layout);
            // Small blocks are never cached.
            let small = Layout::from_size_align(64, 8).unwrap();
            let s = a.alloc(small);
            a.dealloc(s, small);
            assert!(CachingAllocator::take(small).is_null());
            // Drain ours so the cache holds no test memory.
            let r = CachingAllocator::take(layout);
            assert_eq!(r, p);
            System.dealloc(r, layout);
        }
    }
}
