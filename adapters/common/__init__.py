"""Building blocks shared by several built-in families (AdaLN transformer blocks, conv VAE parts)."""
