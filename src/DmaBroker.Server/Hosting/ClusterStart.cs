using DmaBroker.Cluster;
using DmaBroker.Core;

namespace DmaBroker.Server.Hosting;

/// <summary>
/// With <c>--cluster etcd</c>: before the broker serves anyone, loads the cluster's group table
/// from etcd and starts following its watch (SPEC §16).
/// </summary>
internal sealed class ClusterStart(EtcdOwnershipStore store, Broker broker) : IHostedService
{
    public Task StartAsync(CancellationToken cancellationToken) => store.StartAsync(broker, cancellationToken);

    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
}
