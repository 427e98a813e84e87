"""How `TritonServer.stop` reads the exit of a tritonserver that ran out of its exit timeout.

The excerpts are what the bundled Triton 2.51 wrote after SIGTERM (2026-12-06 and -07, this
machine), shortened where marked: one run where a gRPC client was killed mid-request and two models
were never released, one where a request was still running when the timeout expired, and one where
the S3 endpoint of the repository was gone and a repository-index call (which lists the bucket) kept
an HTTP connection open through the whole timeout.
"""

from headmaster.server.triton import _exit_timeout

# A client killed mid-request: every inference finished, two model references never went.
REFERENCES_OUTLIVED = """\
Signal (15) received.
I1206 02:39:19.875362 14736 server.cc:305] "Waiting for in-flight requests to complete."
I1206 02:39:19.875393 14736 server.cc:321] "Timeout 10: Found 0 model versions that have in-flight inferences"
I1206 02:39:19.875405 14736 server.cc:336] "All models are stopped, unloading models"
I1206 02:39:19.875417 14736 server.cc:345] "Timeout 10: Found 8 live models and 0 in-flight non-inference requests"
...
I1206 02:39:28.879285 14736 server.cc:345] "Timeout 1: Found 2 live models and 0 in-flight non-inference requests"
I1206 02:39:29.879533 14736 server.cc:345] "Timeout 0: Found 2 live models and 0 in-flight non-inference requests"
E1206 02:39:29.879603 14736 main.cc:535] "failed to stop server: Internal - Exit timeout expired. Exiting immediately."
"""

# SIGTERM with no drain under a 1,200-image request: inferences still running at the timeout.
REQUESTS_CUT = """\
Signal (15) received.
I1206 02:40:19.376041 15348 server.cc:305] "Waiting for in-flight requests to complete."
I1206 02:40:19.376098 15348 server.cc:321] "Timeout 10: Found 2 model versions that have in-flight inferences"
I1206 02:40:19.376102 15348 server.cc:325] "Model 'classify' (version 1) has 8 in-flight inferences"
I1206 02:40:19.376107 15348 server.cc:325] "Model 'image_encoder' (version 1) has 4 in-flight inferences"
...
I1206 02:40:29.378210 15348 server.cc:321] "Timeout 0: Found 2 model versions that have in-flight inferences"
I1206 02:40:29.378267 15348 server.cc:325] "Model 'classify' (version 1) has 6 in-flight inferences"
I1206 02:40:29.378274 15348 server.cc:325] "Model 'image_encoder' (version 1) has 4 in-flight inferences"
E1206 02:40:29.378289 15348 main.cc:535] "failed to stop server: Internal - Exit timeout expired. Exiting immediately."
"""


# The S3 endpoint gone while serving, then the old drain's repository index and SIGTERM: the call
# waited on the bucket, Triton waited on its connection, and no time was left to unload anything.
CONNECTION_HELD = """\
Signal (15) received.
I1207 04:00:08.640118 10404 http_server.cc:248] "Timeout 10: Found 1 HTTP service connections"
I1207 04:00:09.640236 10404 http_server.cc:248] "Timeout 9: Found 1 HTTP service connections"
...
I1207 04:00:17.641432 10404 http_server.cc:248] "Timeout 1: Found 1 HTTP service connections"
I1207 04:00:24.194442 10404 server.cc:305] "Waiting for in-flight requests to complete."
I1207 04:00:24.194484 10404 server.cc:321] "Timeout 0: Found 0 model versions that have in-flight inferences"
I1207 04:00:24.194860 10404 model_lifecycle.cc:624] "successfully unloaded 'classify' version 1"
...
I1207 04:00:24.196318 10404 server.cc:336] "All models are stopped, unloading models"
I1207 04:00:24.196399 10404 server.cc:345] "Timeout 0: Found 7 live models and 0 in-flight non-inference requests"
E1207 04:00:24.196409 10404 main.cc:535] "failed to stop server: Internal - Exit timeout expired. Exiting immediately."
"""


def test_a_timeout_on_unloading_alone_loses_no_request():
    lost, why = _exit_timeout(REFERENCES_OUTLIVED)
    assert not lost
    assert "2 models still held after every request was answered" in why and "#7368" in why


def test_a_timeout_with_inferences_in_flight_is_a_loss():
    lost, why = _exit_timeout(REQUESTS_CUT)
    assert lost and "inferences still running in 2 model versions" in why


def test_a_model_load_or_other_call_still_in_flight_is_not_waved_through():
    busy = REFERENCES_OUTLIVED.replace(
        "Timeout 0: Found 2 live models and 0 in-flight", "Timeout 0: Found 2 live models and 1 in-flight"
    )
    lost, why = _exit_timeout(busy)
    assert lost and "1 control calls" in why


def test_a_timeout_spent_on_an_open_connection_names_it_and_blames_no_client():
    lost, why = _exit_timeout(CONNECTION_HELD)
    assert not lost  # every inference was answered; the call that held on was the repository index
    assert "waiting for 1 open HTTP connection(s), with 7 models still loaded" in why
    assert "no time was left to unload the models" in why
    assert "gRPC client" not in why and "#7368" not in why


def test_connections_that_closed_before_the_timeout_are_not_the_cause():
    closed = REFERENCES_OUTLIVED.replace(
        "Signal (15) received.\n",
        "Signal (15) received.\n"
        'I1206 02:39:18.0 1 http_server.cc:248] "Timeout 10: Found 1 HTTP service connections"\n'
        'I1206 02:39:19.0 1 http_server.cc:248] "Timeout 9: Found 0 HTTP service connections"\n',
    )
    assert "#7368" in _exit_timeout(closed)[1]


def test_a_server_that_stopped_in_time_or_said_nothing_is_not_read_as_one():
    clean = REFERENCES_OUTLIVED.replace("Exit timeout expired", "")
    assert _exit_timeout(clean) is None
    assert _exit_timeout("") is None
