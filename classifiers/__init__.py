"""Stage two: cheap heads (scikit-learn estimators) on cached backbone features.

- `heads`: the head registry (`get_head`, `list_heads`, `resolve_heads`) and the streaming SGD head
- `mlp`: the Keras dense-net head
- `reduce`: how spatial maps become vectors (`avg`, `max`, `avgmax`, `grid<k>`, `flatten`, `pca<k>`)
- `data`: reading caches within a memory budget; `RowStream` for data larger than RAM
- `evaluate`: held-out or k-fold evaluation as pure functions
- `report`: leaderboard, plots, saved models, report.md
The stage functions that use them are `pipeline.classification.classify` and `pipeline.prediction.predict`.
"""
