rule neighbours:
    """k nearest training neighbours of every training image in one space and metric (FAISS)."""
    input:
        source=neighbours_source,
        data=f"{R}/prepared",
        checked=ancient(CHECKED),
        code=code_of("neighbours"),
    output:
        table=f"{R}/neighbours/{{space}}-{{metric}}/neighbours.parquet",
        grid=report(
            f"{R}/neighbours/{{space}}-{{metric}}/grid.png",
            caption="../report/neighbours_grid.rst",
            category="Neighbours",
            subcategory="{space}-{metric}",
        ),
    params:
        cfg=params_of("neighbours"),
        opts=runtime_of("neighbours"),
        device=DEVICE,
        metric=neighbours_metric,
    log:
        f"{LOGS}/neighbours/{{space}}-{{metric}}.log",
    benchmark:
        f"{R}/benchmarks/neighbours/{{space}}-{{metric}}.tsv"
    conda:
        ENV
    threads: heavy_threads(GPU)
    resources:
        mem_mb=memory("neighbours"),
        runtime=minutes("neighbours", GPU),
        gpu=GPU,
        **site(GPU),
    shell:
        "python -m pipeline --threads {threads} neighbours --metric {params.metric}"
        " --params {params.cfg:q} --runtime {params.opts:q} --device {params.device}"
        " --source {input.source}"
        " --data {input.data} --out {output.table} --grid {output.grid} > {log} 2>&1"


use rule neighbours as neighbours_refresh with:
    input:
        source=refresh_features,
        data=f"{R}/prepared",
        checked=ancient(CHECKED),
        code=code_of("neighbours"),
    output:
        table=f"{R}/neighbours/refresh/{{run}}/seed{{seed}}/neighbours.parquet",
        grid=f"{R}/neighbours/refresh/{{run}}/seed{{seed}}/grid.png",
    log:
        f"{LOGS}/neighbours/refresh/{{run}}-seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/neighbours/refresh/{{run}}-seed{{seed}}.tsv"


rule purity:
    """Neighbour label purity and hubness of every space and metric, side by side."""
    input:
        tables=purity_inputs,
        code=code_of("purity"),
    output:
        report(
            f"{R}/neighbours/purity.csv",
            caption="../report/purity.rst",
            category="Neighbours",
        ),
    log:
        f"{LOGS}/purity.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m pipeline purity --out {output} {input.tables} > {log} 2>&1"
