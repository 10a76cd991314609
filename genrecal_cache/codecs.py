"""The entry-point module of genrecal's Zarr/numcodecs codecs (pyproject.toml, `zarr.codecs` and
`numcodecs.codecs`): installed environments load the codecs by this path, so it stays; the codecs
themselves live in genrecal_cache/format/codecs.py."""

from .format.codecs import EcqCodec, Fp8E4M3Codec, NumcodecsEcq, NumcodecsFp8E4M3

__all__ = ["EcqCodec", "Fp8E4M3Codec", "NumcodecsEcq", "NumcodecsFp8E4M3"]
