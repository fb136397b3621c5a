"""One image under the microscope (Zeiler & Fergus 2014; Yosinski et al. 2015): what the network does with it.

:func:`inspect` writes a self-contained HTML report (figures as PNG, numbers as JSON beside them) for one or more
photos:

1. prediction and layer views: the top classes, and for each layer every channel's activation map as a grid of
   small grayscale tiles, the strongest channel outlined and linked to its unit card when the run has the unit lens
   for that layer (:mod:`atlas.inspect.views`);
2. occlusion sensitivity: a grey square slid over the image, four maps as in Zeiler & Fergus' Fig. 7
   (:mod:`atlas.inspect.occlusion`);
3. invariance curves: vertical translation, scale and rotation against feature distances at a low and a high layer
   and the true class's probability, their Fig. 5 (:mod:`atlas.inspect.invariance`);
4. correspondence analysis: the same part occluded across several images, the consistency of the change in the
   representation against random parts (:mod:`atlas.inspect.correspondence`);
5. the image on the atlas: its activations at every position of the atlas layer placed on the run's atlas
   layout by their nearest sampled activations, drawn as dots over the atlas, in the report and in the viewer
   (``index.html?inspect=NAME``) (:mod:`atlas.inspect.onatlas`).

Every part is a pure array core over the engine (:mod:`atlas.inspect.engine`: one forward, every layer captured)
with a small writer; :mod:`atlas.inspect.instrument` checks the request and picks the parts the settings ask for,
:mod:`atlas.inspect.labels` finds each photo's true class, :mod:`atlas.inspect.folder` writes and publishes the report
folder and :mod:`atlas.inspect.report` writes the page.
"""

from atlas.inspect.engine import batched_forward, channels_last, forward, probabilities, read_image, top_classes
from atlas.inspect.instrument import inspect, report_name
from atlas.inspect.onatlas import image_positions, place_on_atlas
from atlas.inspect.views import channel_grid, grid_layout, strongest_channel, view_layers
from atlas.settings import InspectSettings

__all__ = ["InspectSettings", "batched_forward", "channel_grid", "channels_last", "forward", "grid_layout", "image_positions", "inspect",
           "place_on_atlas", "probabilities", "read_image", "report_name", "strongest_channel", "top_classes", "view_layers"]
