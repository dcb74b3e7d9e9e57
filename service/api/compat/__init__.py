"""Routes that speak other frontends' APIs on top of our engine: A1111's ``/sdapi/v1`` and OpenAI
Images' ``/v1/images`` and ``/v1/models``. Each translates its bodies into our SampleRequest and
submits it the way POST /sample does, so validation and batching stay in one place.

Import the routers from :mod:`.routers`. A1111's names and infotext format live below the API
(``service.a1111_names``, ``service.infotext``): the PNG writer (``service.images``) uses them."""
