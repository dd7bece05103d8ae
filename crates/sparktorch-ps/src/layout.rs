//! Sizes and slices of a [`Layout`]: how many elements a shape and a whole layout cover, and
//! the flat values cut into one slice per entry.

use crate::store::Layout;

/// Elements in a tensor of `shape` (1 for a scalar, shape `[]`); `None` if the product
/// overflows `usize`.
pub fn shape_len(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Elements the whole `layout` covers (the sum of [`shape_len`]); `None` if it overflows
/// `usize`.
pub fn layout_len(layout: &Layout) -> Option<usize> {
    layout.iter().try_fold(0usize, |acc, (_, s)| {
        shape_len(s).and_then(|len| acc.checked_add(len))
    })
}

/// Each entry of `layout` with its slice of the flat `values`, in order: `(name, shape, slice)`.
/// Stops before the first entry that the rest of `values` cannot hold whole, so it yields every
/// entry when `layout_len(layout) == Some(values.len())`.
pub fn tensors<'a, T>(
    layout: &'a Layout,
    values: &'a [T],
) -> impl Iterator<Item = (&'a str, &'a [usize], &'a [T])> + 'a {
    let mut rest = values;
    layout.iter().map_while(move |(name, shape)| {
        let len = shape_len(shape).filter(|&len| len <= rest.len())?;
        let (head, tail) = rest.split_at(len);
        rest = tail;
        Some((name.as_str(), shape.as_slice(), head))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(entries: &[(&str, &[usize])]) -> Layout {
        entries
            .iter()
            .map(|(n, s)| ((*n).to_string(), s.to_vec()))
            .collect()
    }

    #[test]
    fn lengths_multiply_shapes_and_add_entries() {
        assert_eq!(shape_len(&[]), Some(1));
        assert_eq!(shape_len(&[3, 0, 2]), Some(0));
        assert_eq!(shape_len(&[2, 3, 4]), Some(24));
        assert_eq!(shape_len(&[usize::MAX, 2]), None);
        let l = layout(&[("w", &[2, 3]), ("b", &[2]), ("n", &[])]);
        assert_eq!(layout_len(&l), Some(9));
        assert_eq!(layout_len(&Layout::new()), Some(0));
        assert_eq!(layout_len(&layout(&[("x", &[usize::MAX, 2])])), None);
        assert_eq!(
            layout_len(&layout(&[("x", &[usize::MAX]), ("y", &[1])])),
            None
        );
    }

    #[test]
    fn tensors_cut_the_values_per_entry_and_stop_when_they_run_out() {
        let l = layout(&[("w", &[2, 2]), ("b", &[1]), ("n", &[])]);
        let v: Vec<u32> = (0..6).collect();
        let got: Vec<_> = tensors(&l, &v).collect();
        assert_eq!(
            got,
            vec![
                ("w", &[2usize, 2][..], &[0u32, 1, 2, 3][..]),
                ("b", &[1][..], &[4][..]),
                ("n", &[][..], &[5][..]),
            ]
        );
        assert_eq!(tensors(&l, &v[..4]).count(), 1);
        assert_eq!(tensors(&layout(&[("x", &[usize::MAX, 2])]), &v).count(), 0);
    }
}
