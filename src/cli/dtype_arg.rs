//! `--dtype fp32 | fp16 | bf16`, as `sample` and `export` spell it.

use clap::ValueEnum;
use swiftbrush_proto::config::Dtype;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    Fp32,
    Fp16,
    Bf16,
}

impl From<DtypeArg> for Dtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::Fp32 => Dtype::Fp32,
            DtypeArg::Fp16 => Dtype::Fp16,
            DtypeArg::Bf16 => Dtype::Bf16,
        }
    }
}
