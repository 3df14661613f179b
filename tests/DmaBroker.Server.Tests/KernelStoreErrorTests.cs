using DmaBroker.Core;
using DmaBroker.Core.Ownership;
using DmaBroker.Core.Topology;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using CoreSession = DmaBroker.Core.Sessions.Session;

namespace DmaBroker.Server.Tests;

/// <summary>
/// SPEC §9 on the Kernel service when a cluster store (SPEC §16) refuses a driver change or a
/// hotplug: each refusal the etcd store makes reaches the wire as its errno and gRPC code, never
/// INTERNAL, and changes nothing.
/// </summary>
public sealed class KernelStoreErrorTests
{
    /// <summary>Refuses every driver change and hotplug with <see cref="Refusal"/>; grants claims as one process does.</summary>
    private sealed class RefusingStore : IOwnershipStore
    {
        public ErrnoException? Refusal { get; set; }
        public string? Replica => "test";
        public ulong FirstSessionId => 1;
        public ulong CommitClaim(uint groupId, CoreSession session, int countBefore, ulong generation) => countBefore == 0 ? generation + 1 : generation;
        public void CommitRelease(uint groupId, CoreSession session, int countBefore, int countAfter, ulong generation) { }
        public void SessionEnded(CoreSession session) { }
        public void CommitDriver(uint groupId, GroupOwner owner, PciAddress device, string? driverBefore, string? driverAfter, int kernelCountAfter) => Refuse();
        public void CommitHotplug(PciFunctionSpec device, uint groupId, GroupOwner owner, bool added, string? driver, int kernelCountAfter) => Refuse();
        private void Refuse()
        {
            if (Refusal is { } refusal)
                throw refusal;
        }
    }

    // What the etcd store throws (EtcdOwnershipStore.CommitDriver, CommitHotplug, Call), and the code each must reach the wire as.
    public static TheoryData<string, StatusCode> Refusals => new()
    {
        { "EAGAIN", StatusCode.FailedPrecondition },   // changed on another replica, or etcd did not answer in time
        { "EBUSY", StatusCode.FailedPrecondition },    // a DMA-API bind into a group a session of another replica owns
        { "EINVAL", StatusCode.FailedPrecondition },   // unbound on another replica meanwhile
        { "EEXIST", StatusCode.AlreadyExists },        // added on another replica meanwhile
        { "ENODEV", StatusCode.NotFound },             // removed on another replica meanwhile
    };

    private static ErrnoException Refusal(string errno) => errno switch
    {
        "EAGAIN" => new ErrnoException(Errno.EAGAIN, ErrorKind.FailedPrecondition, "changed on another replica; try again") { RetryAfter = TimeSpan.FromMilliseconds(100) },
        "EBUSY" => ErrnoException.Busy("group is owned by session 7 on replica b in the cluster"),
        "EINVAL" => ErrnoException.Conflict(Errno.EINVAL, "it was unbound on another replica"),
        "EEXIST" => ErrnoException.Exists("it was added on another replica"),
        _ => ErrnoException.NoDevice(PciAddress.Parse("0000:02:00.1")),
    };

    [Theory]
    [MemberData(nameof(Refusals))]
    public async Task KernelCalls_RefusedByTheClusterStore_ReachTheWireWithTheirErrno_AndChangeNothing(string errno, StatusCode code)
    {
        var store = new RefusingStore();
        await using var broker = await TestBroker.StartWithAsync(services =>
            services.Replace(ServiceDescriptor.Singleton(_ => new Broker(TopologyDocument.Default(), new BrokerOptions { Store = store }))));
        store.Refusal = Refusal(errno);
        var kernel = broker.Client.Raw.Kernel;
        var before = broker.Broker.Journal.Current;
        Func<Task>[] calls =
        [
            () => kernel.UnbindDriverAsync(new UnbindDriverRequest { Address = "0000:02:00.1" }).ResponseAsync,
            () => kernel.UnbindDriverAsync(new UnbindDriverRequest { Address = "0000:08:00.0" }).ResponseAsync,
            () => kernel.BindDriverAsync(new BindDriverRequest { Address = "0000:03:00.1", Driver = "snd_hda_intel" }).ResponseAsync,
            () => kernel.AddDeviceAsync(new AddDeviceRequest { Address = "0000:00:1f.0", VendorId = 0x1234, DeviceId = 0x11e8, ClassCode = 0x00ff00, Model = "edu", Acs = true }).ResponseAsync,
            () => kernel.RemoveDeviceAsync(new RemoveDeviceRequest { Address = "0000:02:00.1" }).ResponseAsync,
        ];
        foreach (var call in calls)
        {
            var e = await Assert.ThrowsAsync<RpcException>(call);
            var info = e.GetRpcStatus()?.GetDetail<Google.Rpc.ErrorInfo>();
            Assert.Equal((code, errno), (e.StatusCode, info?.Reason));
            if (errno == "EAGAIN")
                Assert.NotNull(e.GetRpcStatus()?.GetDetail<Google.Rpc.RetryInfo>());
        }
        Assert.Same(before, broker.Broker.Journal.Current);
    }
}
