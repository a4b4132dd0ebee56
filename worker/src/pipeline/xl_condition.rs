//! SDXL's condition as one tensor, so that the VSD step, which only
//! concatenates, expands and slices a condition's rows (guidance batches,
//! micro-batches, the null condition), carries SDXL's three parts without
//! knowing them: [B, L + 2, D], the text hidden states [B, L, D], then a
//! row holding the pooled embedding [B, P] (P <= D, zero-padded), then a
//! row holding the six time ids (zero-padded). An SDXL UNet's
//! [`crate::diffusion::Denoiser`] pass (`pipeline/unet.rs`) unpacks it.
//! tests/reference/golden_vsd_xl.py packs the same way.

use tch::{TchError, Tensor};

use crate::models::text_time_embedding::AddedConditions;

/// Rows after the text hidden states: the pooled embedding, the time ids.
pub const EXTRA_ROWS: i64 = 2;

/// Packs `hidden` [B, L, D], `pooled` [B, P] and `time_ids` [B, 6] into
/// [B, L + 2, D] in `hidden`'s dtype. P and 6 must not exceed D.
pub fn pack(hidden: &Tensor, pooled: &Tensor, time_ids: &Tensor) -> Result<Tensor, TchError> {
    let (b, _, d) = hidden.size3()?;
    let row = |t: &Tensor| -> Result<Tensor, TchError> {
        let w = t.size2()?.1;
        if w > d {
            return Err(TchError::Shape(format!(
                "an SDXL condition row of width {w} does not fit beside text states of width {d}"
            )));
        }
        t.f_to_kind(hidden.kind())?
            .f_constant_pad_nd([0, d - w])?
            .f_reshape([b, 1, d])
    };
    Tensor::f_cat(&[hidden, &row(pooled)?, &row(time_ids)?], 1)
}

/// The text hidden states and the added conditions (pooled width
/// `pooled_dim`) of a packed condition.
pub fn unpack(c: &Tensor, pooled_dim: i64) -> Result<(Tensor, AddedConditions), TchError> {
    let (_, rows, _) = c.size3()?;
    if rows <= EXTRA_ROWS {
        return Err(TchError::Shape(format!(
            "an SDXL UNet takes a packed condition (text states, pooled row, time-ids row), \
             got {rows} rows"
        )));
    }
    let l = rows - EXTRA_ROWS;
    Ok((
        c.f_narrow(1, 0, l)?,
        AddedConditions {
            text_embeds: c.f_select(1, l)?.f_narrow(1, 0, pooled_dim)?,
            time_ids: c.f_select(1, l + 1)?.f_narrow(1, 0, 6)?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn unpack_returns_what_pack_took() {
        let opts = (Kind::Float, Device::Cpu);
        let hidden = Tensor::randn([3, 5, 10], opts);
        let pooled = Tensor::randn([3, 7], opts);
        let ids = Tensor::from_slice(&[16f32, 16., 0., 0., 16., 16.]).repeat([3, 1]);
        let c = pack(&hidden, &pooled, &ids).unwrap();
        assert_eq!(c.size(), [3, 7, 10]);
        let (h, added) = unpack(&c, 7).unwrap();
        assert_eq!(h, hidden);
        assert_eq!(added.text_embeds, pooled);
        assert_eq!(added.time_ids, ids);
        let wide = Tensor::randn([3, 11], opts);
        assert!(pack(&hidden, &wide, &ids).is_err());
    }
}
