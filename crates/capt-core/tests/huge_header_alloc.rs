//! A header claiming 20000x20000 is rejected before any pixel buffer is allocated: a counting
//! global allocator records the largest single allocation made while decoding it. (Its own test
//! binary, with one test, so no other test's allocations are counted.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use capt_core::preprocess::{decode_image_with_alpha, PreprocessError};
use common::*;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn huge_headers_allocate_no_pixel_buffer() {
    // 20000x20000 RGB would be 1.2 GB; anything near even 1% of that means decoding started.
    const LIMIT: usize = 8 * 1024 * 1024;
    let cases = [
        ("huge.png", png_claiming(HUGE, HUGE)),
        ("huge.jpg", jpeg_claiming(HUGE as u16, HUGE as u16)),
        ("huge.bmp", bmp_claiming(HUGE as i32, HUGE as i32)),
        ("huge.webp", webp_claiming(HUGE, HUGE)),
    ];
    for (name, bytes) in &cases {
        LARGEST.store(0, Ordering::Relaxed);
        let err = decode_image_with_alpha(bytes, name).unwrap_err();
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            largest < LIMIT,
            "{name}: allocated {largest} bytes at once before failing ({err})"
        );
        assert!(
            matches!(
                err,
                PreprocessError::TooLarge { .. } | PreprocessError::Decode { .. }
            ),
            "{err}"
        );
    }
    // The counter works: a real decode does allocate its pixels.
    LARGEST.store(0, Ordering::Relaxed);
    decode_image_with_alpha(&fixture("imagenet_gown_portrait.jpeg"), "gown").unwrap();
    assert!(LARGEST.load(Ordering::Relaxed) >= 413 * 580 * 3);
}
