//! `f32` cells with relaxed atomic loads and stores, for lock-free (HOGWILD!) updates.

use std::sync::atomic::{AtomicU32, Ordering};

/// An `f32` stored in an [`AtomicU32`]. Loads and stores are `Relaxed`: concurrent updates of
/// one element may be lost or interleave (as HOGWILD! allows) but never tear or race.
#[repr(transparent)]
#[derive(Debug, Default)]
pub struct AtomicF32(AtomicU32);

impl AtomicF32 {
    /// A cell holding `v`.
    pub fn new(v: f32) -> Self {
        Self(AtomicU32::new(v.to_bits()))
    }

    /// Relaxed load.
    #[inline(always)]
    pub fn load(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }

    /// Relaxed store.
    #[inline(always)]
    pub fn store(&self, v: f32) {
        self.0.store(v.to_bits(), Ordering::Relaxed)
    }

    /// A buffer of cells initialised from `values`.
    pub fn vec_from(values: &[f32]) -> Vec<AtomicF32> {
        values.iter().map(|&v| AtomicF32::new(v)).collect()
    }

    /// A buffer of `len` cells holding `v`.
    pub fn vec_filled(v: f32, len: usize) -> Vec<AtomicF32> {
        (0..len).map(|_| AtomicF32::new(v)).collect()
    }

    /// View an exclusively borrowed buffer of cells as plain `f32`s.
    #[inline]
    pub fn as_mut_f32(cells: &mut [AtomicF32]) -> &mut [f32] {
        // SAFETY: AtomicF32 is repr(transparent) over AtomicU32, which has the same size and
        // alignment as u32 and therefore f32 (std documents AtomicU32's in-memory
        // representation as u32's). The exclusive borrow rules out any concurrent atomic access
        // for the lifetime of the returned slice.
        unsafe { std::slice::from_raw_parts_mut(cells.as_mut_ptr().cast::<f32>(), cells.len()) }
    }

    /// Copy the cells out (relaxed loads).
    pub fn snapshot(cells: &[AtomicF32]) -> Vec<f32> {
        cells.iter().map(AtomicF32::load).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_mut_view() {
        let mut cells = AtomicF32::vec_from(&[1.0, -2.5, f32::INFINITY]);
        assert_eq!(AtomicF32::snapshot(&cells), vec![1.0, -2.5, f32::INFINITY]);
        AtomicF32::as_mut_f32(&mut cells)[1] = 7.0;
        assert_eq!(cells[1].load(), 7.0);
        cells[0].store(3.0);
        assert_eq!(AtomicF32::as_mut_f32(&mut cells)[0], 3.0);
    }
}
