import pytest

from fastvae import PRESETS, FastVAEError, VAEConfig, preset


def test_presets_match_the_papers():
    pe, paper, iwae = preset("pytorch-example"), preset("paper"), preset("iwae")
    assert (pe.flat_dim, pe.hidden_dims, pe.latent_dim, pe.activation) == (784, (400,), 20, "relu")
    assert (paper.flat_dim, paper.hidden_dims, paper.latent_dim, paper.activation) == (
        784,
        (500,),
        20,
        "tanh",
    )
    assert (iwae.flat_dim, iwae.hidden_dims, iwae.latent_dim, iwae.activation) == (
        784,
        (200, 200),
        50,
        "tanh",
    )
    assert set(PRESETS) == {"pytorch-example", "paper", "iwae", "iwae-k5", "iwae-k50", "beta-vae-dsprites"}
    # beta-VAE (Higgins et al., 2017) on dSprites: 4096-1200-1200, 10 latents, beta 4, batch 64
    b = preset("beta-vae-dsprites")
    assert (b.flat_dim, b.hidden_dims, b.latent_dim, b.beta) == (4096, (1200, 1200), 10, 4.0)
    assert (iwae.objective, iwae.k) == ("elbo", 1)
    for name, k in (("iwae-k5", 5), ("iwae-k50", 50)):
        c = preset(name)
        assert (c.hidden_dims, c.latent_dim, c.activation, c.objective, c.k) == (
            (200, 200),
            50,
            "tanh",
            "iwae",
            k,
        )


def test_input_dim_int_or_shape():
    assert VAEConfig(input_dim=50).data_shape == (50,)
    assert VAEConfig(input_dim=[1, 28, 28]).flat_dim == 784


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"input_dim": 0}, "input_dim"),
        ({"input_dim": (1, -2)}, "input_dim"),
        ({"hidden_dims": ()}, "hidden_dims"),
        ({"hidden_dims": 400}, "hidden_dims"),
        ({"hidden_dims": (400, 0)}, "hidden_dims"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"latent_dim": 2.5}, "latent_dim"),
        ({"activation": "gelu"}, "activation"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"beta": -1.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
    ],
)
def test_bad_config_raises_clear_valueerror(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        VAEConfig(**kwargs)


def test_dict_round_trip_and_unknown_key():
    cfg = preset("iwae")
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(FastVAEError, match="unknown config key"):
        VAEConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})
    with pytest.raises(FastVAEError, match="unknown preset"):
        preset("resnet")
