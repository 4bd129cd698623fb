"""LoRA adapters load into LCADPipeline through diffusers' own StableDiffusionLoraLoaderMixin."""

import numpy as np
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers.utils import convert_state_dict_to_diffusers

from lcad_pipeline import LCADPipeline
from tiny_models import make_tiny_pipeline


def _run(pipe, image, **kwargs):
    return pipe(image, "a red cup", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def test_lora_weights_save_load_and_scale(tmp_path, coffee_gray):
    image = coffee_gray.resize((32, 32))
    base = make_tiny_pipeline()
    plain = _run(base, image)

    tuned = make_tiny_pipeline()
    torch.manual_seed(0)
    tuned.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    with_lora = _run(tuned, image)
    assert not np.allclose(with_lora, plain, atol=1e-4)
    LCADPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(tuned.unet))
    )

    base.load_lora_weights(tmp_path)
    np.testing.assert_allclose(_run(base, image), with_lora, atol=1e-5)
    np.testing.assert_allclose(_run(base, image, cross_attention_kwargs={"scale": 0.0}), plain, atol=1e-5)
    base.unload_lora_weights()
    np.testing.assert_allclose(_run(base, image), plain, atol=1e-5)
