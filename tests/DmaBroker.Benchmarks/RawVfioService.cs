using DmaBroker.Protocol.V1;
using Grpc.Core;

namespace DmaBroker.Benchmarks;

/// <summary>
/// The unary baseline: the claim and release calls (SetContainer, UnsetContainer) over the same kind
/// of server, answered at once with an empty response and no broker work (no session, ownership
/// table or lock). The broker's cycles/s divided by this one's is what claiming costs on top of two
/// gRPC unary calls.
/// </summary>
public sealed class RawVfioService : Vfio.VfioBase
{
    private static readonly Task<SetContainerResponse> Set = Task.FromResult(new SetContainerResponse());
    private static readonly Task<UnsetContainerResponse> Unset = Task.FromResult(new UnsetContainerResponse());

    public override Task<SetContainerResponse> SetContainer(SetContainerRequest request, ServerCallContext context) => Set;

    public override Task<UnsetContainerResponse> UnsetContainer(UnsetContainerRequest request, ServerCallContext context) => Unset;
}
