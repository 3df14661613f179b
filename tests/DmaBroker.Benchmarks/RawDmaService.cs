using Grpc.Core;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Benchmarks;

/// <summary>
/// The baseline: the same Dma.Stream messages over the same kind of server, answered with a bare
/// completion per request and no broker work at all (no session, translation or copy). The
/// broker's figure divided by this one is what the broker costs on top of gRPC itself.
/// </summary>
public sealed class RawDmaService : Dma.DmaBase
{
    public override async Task Stream(IAsyncStreamReader<DmaRequest> requestStream, IServerStreamWriter<DmaResponse> responseStream, ServerCallContext context)
    {
        while (await requestStream.MoveNext(context.CancellationToken))
        {
            var request = requestStream.Current;
            if (request.Batch is { } batch)
            {
                foreach (var inner in batch.Requests)
                    await responseStream.WriteAsync(Complete(inner));
            }
            else if (request.Open is null)
            {
                await responseStream.WriteAsync(Complete(request));
            }
        }
    }

    private static DmaResponse Complete(DmaRequest request) =>
        new() { Completion = new DmaCompletion { Tag = request.Tag, Ok = true } };
}
