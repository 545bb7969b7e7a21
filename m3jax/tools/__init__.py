"""What a trained model is used for: export, merge, mining hard negatives, teacher scores, model cards."""
