//! The two scores the VSD gradient compares: the frozen teacher's (real,
//! eps_phi) and the fake score that learns the student's distribution
//! (eps_psi: SwiftBrush's LoRA teacher, or DMD2's full trainable copy).
//! Each call names the score it wants, so no caller has to remember to
//! switch adapters on or off.

use tch::{TchError, Tensor};

pub use swiftbrush_proto::config::FakeScore;

/// The real and the fake score of one run. Both take latents `x`
/// [B,C,h,w], one timestep per sample `t` [B] and the text condition `c`
/// [B,77,D], and return the raw model output (what the schedule's
/// `prediction_type` says it is).
pub trait Scores {
    /// The frozen teacher eps_phi (no trainable weights).
    fn real(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError>;
    /// The fake score eps_psi, with gradients into its trainable weights
    /// when called with them.
    fn fake(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor, TchError>;
    /// Which fake score this is, and so how the step scores and trains it:
    /// SwiftBrush's LoRA teacher (guided in step 3; step 6 weighted by
    /// sqrt(abar_t') with text dropout) or DMD2's full copy (SPEC "known
    /// variants": unweighted eps-MSE, no text dropout, and so scored on the
    /// caption alone in step 3, DMD2's fake guidance 1: its null branch
    /// never trains, so guiding it would mix a tracking score with the
    /// frozen teacher's).
    fn form(&self) -> FakeScore;

    /// [`Self::real`] and [`Self::fake`] on the same inputs, without
    /// gradients. A pair whose fake score is adapters over the real one's
    /// weights (SwiftBrush's LoRA teacher) runs them as one pass of twice
    /// the batch, the adapters on its second half only: the same
    /// arithmetic in half the kernel launches, each on twice the rows.
    fn both(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        Ok((self.real(x, t, c)?, self.fake(x, t, c)?))
    }
}
