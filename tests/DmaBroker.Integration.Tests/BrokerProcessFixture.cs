using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using DmaBroker.Server.Hosting;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.Extensions.DependencyInjection;

namespace DmaBroker.Integration.Tests;

/// <summary>A real broker on a free loopback port, for client processes to reach.</summary>
public sealed class LiveBroker : IAsyncDisposable
{
    private readonly WebApplication _app;

    private LiveBroker(WebApplication app, string address)
    {
        _app = app;
        Address = address;
        Client = BrokerClient.Connect(address);
    }

    public string Address { get; }
    public BrokerClient Client { get; }

    public static async Task<LiveBroker> StartAsync(params string[] args)
    {
        var app = BrokerHost.Build(["--listen", "http://127.0.0.1:0", "--Logging:LogLevel:Default=Warning", .. args]);
        await app.StartAsync();
        var address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()?.Addresses.Single()
            ?? throw new InvalidOperationException("the server reported no address");
        return new LiveBroker(app, address);
    }

    public async ValueTask DisposeAsync()
    {
        Client.Dispose();
        await _app.StopAsync();
        await _app.DisposeAsync();
    }
}

/// <summary>Group events from a watch stream, each wait bounded.</summary>
public sealed class GroupWatch : IAsyncDisposable
{
    private readonly CancellationTokenSource _cts = new();
    private readonly IAsyncEnumerator<WatchEvent> _events;

    private GroupWatch(BrokerClient client) => _events = client.WatchAsync(_cts.Token).GetAsyncEnumerator(_cts.Token);

    public static async Task<GroupWatch> StartAsync(BrokerClient client)
    {
        var watch = new GroupWatch(client);
        await watch.NextAsync(); // the snapshot
        return watch;
    }

    public async Task<WatchEvent> NextAsync()
    {
        Assert.True(await _events.MoveNextAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30)), "watch ended");
        return _events.Current;
    }

    public async Task<Group> WaitForAsync(uint groupId, OwnerKind owner)
    {
        while (true)
        {
            var ev = await NextAsync();
            if (ev.Group is { } g && g.Id == groupId && g.OwnerKind == owner)
                return g;
        }
    }

    /// <summary>Waits until a session has ended with everything it held released.</summary>
    public async Task<SessionEnded> WaitForSessionEndedAsync(ulong sessionId)
    {
        while (true)
        {
            var ev = await NextAsync();
            if (ev.SessionEnded is { } ended && ended.SessionId == sessionId)
                return ended;
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _cts.CancelAsync();
        try
        {
            await _events.DisposeAsync();
        }
        catch (Exception e) when (e is OperationCanceledException or BrokerException or Grpc.Core.RpcException)
        {
            // Cancelled on purpose.
        }
        _cts.Dispose();
    }
}
