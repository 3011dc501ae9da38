"""The authors' MPRNet forward (swz30/MPRNet), step for step, on our modules' weights.

The baseline that `speed.py` measures `mprnet` against. It keeps their call pattern, not
ours: each patch through its stage separately, features concatenated into new tensors,
every intermediate held to the end, a separate PReLU after each convolution, gates and
residuals computed out of place, and every stage-3 skip upsampled and convolved at full
resolution. Only our modules' parameters are used, never their forwards, so whatever
`mprnet_cli.model.network` optimises does not leak into the baseline. On the tiny parity
checkpoint it reproduces the authors' own outputs in tests/data/parity exactly (all three
stages, both sizes; tests/test_published_baseline.py), and it agrees with our forward to
5e-7 at the derain width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def authors_forward(model: nn.Module, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(stage 3, stage 2, stage 1) images for a padded NCHW float batch, under `no_grad`."""
    height, width = image.shape[-2:]
    top, bottom = image[..., : height // 2, :], image[..., height // 2 :, :]
    quarters = [top[..., : width // 2], top[..., width // 2 :], bottom[..., : width // 2], bottom[..., width // 2 :]]
    shallow1 = [_shallow(model.shallow_feat1, quarter) for quarter in quarters]
    encoded1 = [_encode(model.stage1_encoder, features) for features in shallow1]
    top1 = [torch.cat(pair, 3) for pair in zip(encoded1[0], encoded1[1])]
    bottom1 = [torch.cat(pair, 3) for pair in zip(encoded1[2], encoded1[3])]
    decoded1 = [_decode(model.stage1_decoder, top1), _decode(model.stage1_decoder, bottom1)]
    sam1 = [_supervised_attention(model.sam12, decoded1[0][0], top),
            _supervised_attention(model.sam12, decoded1[1][0], bottom)]
    stage1_image = torch.cat([sam1[0][1], sam1[1][1]], 2)
    shallow2 = [_shallow(model.shallow_feat2, top), _shallow(model.shallow_feat2, bottom)]
    x2 = [model.concat12(torch.cat([shallow2[half], sam1[half][0]], 1)) for half in range(2)]
    encoded2 = [_encode(model.stage2_encoder, x2[0], top1, decoded1[0]),
                _encode(model.stage2_encoder, x2[1], bottom1, decoded1[1])]
    joined2 = [torch.cat(pair, 2) for pair in zip(*encoded2)]
    decoded2 = _decode(model.stage2_decoder, joined2)
    gated2, stage2_image = _supervised_attention(model.sam23, decoded2[0], image)
    x3 = model.concat23(torch.cat([_shallow(model.shallow_feat3, image), gated2], 1))
    x3 = _orsnet(model.stage3_orsnet, x3, joined2, decoded2)
    return model.tail(x3) + image, stage2_image, stage1_image


def _attention_block(block: nn.Module, x: Tensor) -> Tensor:
    features = block.body(x)  # conv, PReLU, conv: the plain modules
    gate = block.CA.conv_du(F.adaptive_avg_pool2d(features, 1))
    features = features * gate
    features += x
    return features


def _attention_blocks(blocks: nn.Sequential, x: Tensor) -> Tensor:
    for block in blocks:
        x = _attention_block(block, x)
    return x


def _shallow(layers: nn.Sequential, x: Tensor) -> Tensor:
    conv, block = layers
    return _attention_block(block, conv(x))


def _encode(encoder: nn.Module, x: Tensor, encoded: list[Tensor] | None = None,
            decoded: list[Tensor] | None = None) -> list[Tensor]:
    levels = []
    for level in (1, 2, 3):
        if level > 1:
            x = getattr(encoder, f"down{level - 1}{level}").down(levels[-1])
        x = _attention_blocks(getattr(encoder, f"encoder_level{level}"), x)
        if encoded is not None and decoded is not None:
            x = x + getattr(encoder, f"csff_enc{level}")(encoded[level - 1]) + \
                getattr(encoder, f"csff_dec{level}")(decoded[level - 1])
        levels.append(x)
    return levels


def _decode(decoder: nn.Module, encoded: list[Tensor]) -> list[Tensor]:
    level3 = _attention_blocks(decoder.decoder_level3, encoded[2])
    x = decoder.up32.up(level3) + _attention_block(decoder.skip_attn2, encoded[1])
    level2 = _attention_blocks(decoder.decoder_level2, x)
    x = decoder.up21.up(level2) + _attention_block(decoder.skip_attn1, encoded[0])
    level1 = _attention_blocks(decoder.decoder_level1, x)
    return [level1, level2, level3]


def _supervised_attention(sam: nn.Module, features: Tensor, degraded: Tensor) -> tuple[Tensor, Tensor]:
    gated = sam.conv1(features)
    image = sam.conv2(features) + degraded
    gated = gated * torch.sigmoid(sam.conv3(image))
    return gated + features, image


def _orsnet(orsnet: nn.Module, x: Tensor, encoded: list[Tensor], decoded: list[Tensor]) -> Tensor:
    for level, block in enumerate((orsnet.orb1, orsnet.orb2, orsnet.orb3)):
        features = _attention_blocks(block.body[:-1], x)
        x = block.body[-1](features) + x
        enc, dec = encoded[level], decoded[level]
        if level:
            enc = _upsample(getattr(orsnet, f"up_enc{level}"), enc)
            dec = _upsample(getattr(orsnet, f"up_dec{level}"), dec)
        x = x + getattr(orsnet, f"conv_enc{level + 1}")(enc) + getattr(orsnet, f"conv_dec{level + 1}")(dec)
    return x


def _upsample(upsamples: nn.Module, x: Tensor) -> Tensor:
    """Each UpSample as published: bilinear upsampling, then its 1x1 convolution."""
    for upsample in upsamples if isinstance(upsamples, nn.Sequential) else [upsamples]:
        x = upsample.up(x)
    return x
