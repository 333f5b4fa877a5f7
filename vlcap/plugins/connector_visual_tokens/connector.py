from vlcap.api import Connector, ImagePrefix, ImageTokens, VlcapError
from vlcap.plugins.connector_visual_tokens.config import VisualTokensConfig
from vlcap.plugins.connector_visual_tokens.layer import Projector


class VisualTokensConnector(Connector):
    name = "visual-tokens"
    description = "Projected image tokens placed before the text, read by the decoder's self-attention (ClipCap/LLaVA)"
    config_class = VisualTokensConfig

    def apply(self, captioner, config):
        encoder, decoder = captioner.encoder, captioner.decoder
        width = decoder.cfg.n_embd
        # projector, hidden and dropout are validated where the options enter (their annotations);
        # the grid's bound depends on the encoder, so it is checked here.
        rows, cols = encoder.grid_size
        if config.grid is not None and not (isinstance(config.grid, int) and 1 <= config.grid <= min(rows, cols)):
            raise VlcapError(f"connector.options.grid: pools the {rows}x{cols} patch grid, so give 1..{min(rows, cols)} "
                             f"(or null: no pooling), got {config.grid}")
        grid = (rows, cols) if config.grid is None else (config.grid, config.grid)
        captioner.projection = Projector(encoder.embed_dim, width, config.projector, config.hidden or width,
                                         config.dropout, encoder.num_prefix_tokens, encoder.grid_size, config.grid)
        captioner.image_tokens = ImageTokens(encoder.num_prefix_tokens, grid)
        decoder.image_prefix = ImagePrefix(position_embeddings=config.position_embeddings)
