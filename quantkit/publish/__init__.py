"""Publishing a build: model cards, a quality plot, and Hub repos (one per format)."""
