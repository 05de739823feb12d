"""Analysis of stored activations: emotion vectors, token vectors, subspaces, probes, cross-model alignment.

Plain Python on numpy arrays (no Dagster, no pickle, no global state). Every statistic is computed in float64
even when activations are stored as float32/bfloat16. Modules:

- `labels`        label encoding and the default emotion order
- `blas`          one-BLAS-thread policy (small matrices run much faster single-threaded)
- `vectors`       sentence-end emotion vectors, centred cosines, separation score
- `token_vectors` first-token-free sentence means and emotion-word token vectors
- `subspaces`     per-emotion PCA subspaces, principal angles, overlap and its random baseline
- `probes`        cross-validated logistic-regression probes, bag-of-words baseline, control task
- `alignment`     linear CKA, RSA of cosine matrices, cross-model subspace overlap
- `plots`         PNG figures written atomically (Agg backend)
- `report`        Markdown report rendering
- `tables`        conversion of polars frames / lists of dicts into rows
"""
