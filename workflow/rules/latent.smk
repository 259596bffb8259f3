rule train_latent:
    """Learn a latent space (auto-decoder, auto-encoder or VAE) on the training images."""
    input:
        data=f"{R}/prepared",
        checked=ancient(CHECKED),
        code=code_of("train-latent"),
    output:
        model=f"{R}/latent/{{model}}/model.pt",
        curve=f"{R}/latent/{{model}}/loss.csv",
        loss_plot=report(
            f"{R}/latent/{{model}}/loss.png",
            caption="../report/latent_loss.rst",
            category="Latent spaces",
            subcategory="{model}",
        ),
        recon_plot=report(
            f"{R}/latent/{{model}}/recon.png",
            caption="../report/latent_recon.rst",
            category="Latent spaces",
            subcategory="{model}",
        ),
    params:
        cfg=latent_cfg,
        opts=runtime_of("latent"),
        device=DEVICE,
    log:
        f"{LOGS}/train_latent/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/train_latent/{{model}}.tsv"
    conda:
        ENV
    threads: heavy_threads(GPU)
    resources:
        mem_mb=memory("train_latent"),
        runtime=minutes("train_latent", GPU),
        gpu=GPU,
        **site(GPU),
    shell:
        "python -m pipeline --threads {threads} train-latent --model {wildcards.model}"
        " --params {params.cfg:q} --runtime {params.opts:q} --device {params.device}"
        " --data {input.data}"
        " --out {output.model} --curve {output.curve} --loss-plot {output.loss_plot}"
        " --recon-plot {output.recon_plot} > {log} 2>&1"


rule export_latents:
    """One Parquet row per image (train and test) with its latent vector."""
    input:
        model=f"{R}/latent/{{model}}/model.pt",
        data=f"{R}/prepared",
        code=code_of("export-latents"),
    output:
        f"{R}/latent/{{model}}/latents.parquet",
    params:
        dataset=DS,
        device=DEVICE,
    log:
        f"{LOGS}/export_latents/{{model}}.log",
    conda:
        ENV
    threads: heavy_threads(GPU)
    resources:
        mem_mb=memory("export_latents"),
        runtime=minutes("export_latents", GPU),
        gpu=GPU,
        **site(GPU),
    shell:
        "python -m pipeline --threads {threads} export-latents --checkpoint {input.model}"
        " --data {input.data} --out {output} --dataset {params.dataset}"
        " --device {params.device} > {log} 2>&1"
