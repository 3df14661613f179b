using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using DmaBroker.Server.Hosting;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Logging;

namespace DmaBroker.Server.Tests;

/// <summary>
/// A real broker on a free loopback port, with an optional fake clock. Disposing it fails the test
/// if the broker logged an error the test did not declare with <see cref="ExpectErrors"/>.
/// </summary>
public sealed class TestBroker : IAsyncDisposable
{
    public static readonly TimeSpan Timeout = TimeSpan.FromSeconds(10);

    private readonly WebApplication _app;

    private TestBroker(WebApplication app, string address, BrokerLog log, EndedRequests ended)
    {
        _app = app;
        Address = address;
        Log = log;
        Ended = ended;
        Client = BrokerClient.Connect(address);
        Broker = app.Services.GetRequiredService<Core.Broker>();
    }

    public string Address { get; }

    /// <summary>The <c>--http-listen</c> address (/, /events, /metrics); throws when started with <c>--http-listen none</c>.</summary>
    public string WebAddress => _app.WebAddress() ?? throw new InvalidOperationException("this test broker's --http-listen is off");

    /// <summary>The web listener's requests the broker has finished serving, by path, in order.</summary>
    public EndedRequests Ended { get; }

    public BrokerClient Client { get; }
    public Core.Broker Broker { get; }

    /// <summary>The broker host's services (its loggers, options…).</summary>
    public IServiceProvider Services => _app.Services;

    /// <summary>Everything the broker logged at Warning or above.</summary>
    public BrokerLog Log { get; }

    /// <summary>Declares errors the broker may log in this test, e.g. <c>r => r.EventId.Id == 101</c>.</summary>
    public void ExpectErrors(Func<BrokerLogRecord, bool> match) => Log.ExpectErrors(match);

    public static Task<TestBroker> StartAsync(TimeProvider? time = null, params string[] args) =>
        StartWithAsync(services =>
        {
            if (time is not null)
                services.Replace(ServiceDescriptor.Singleton(time));
        }, args);

    /// <summary>A broker whose services <paramref name="configure"/> changes last (a store of the test's own, for example).</summary>
    public static async Task<TestBroker> StartWithAsync(Action<IServiceCollection> configure, params string[] args)
    {
        var log = new BrokerLog();
        var ended = new EndedRequests();
        var app = BrokerHost.Build(["--listen", "http://127.0.0.1:0", "--http-listen", "http://127.0.0.1:0", "--Logging:LogLevel:Default=Warning", .. args], services =>
        {
            services.AddLogging(logging => logging.AddProvider(log));
            services.AddSingleton<IStartupFilter>(ended);
            configure(services);
        });
        var address = await app.StartAndGetAddressAsync();
        return new TestBroker(app, address, log, ended);
    }

    /// <summary>Raw clients authenticated with an arbitrary (possibly missing) token.</summary>
    public Vfio.VfioClient VfioWithToken(string? token)
    {
        var invoker = Client.Raw.Channel.CreateCallInvoker();
        return new Vfio.VfioClient(token is null ? invoker : Grpc.Core.Interceptors.CallInvokerExtensions.Intercept(invoker, m =>
        {
            m.Add(BrokerSession.TokenHeader, token);
            return m;
        }));
    }

    /// <summary>Stops the broker: the host's ApplicationStopping fires, then it waits for requests to end.</summary>
    public Task StopAsync() => _app.StopAsync();

    /// <summary>Stops the broker, then fails if it logged an unexpected error, while running or while stopping.</summary>
    public async ValueTask DisposeAsync()
    {
        Client.Dispose();
        await _app.StopAsync();
        await _app.DisposeAsync();
        Log.VerifyNoUnexpectedErrors();
    }
}

/// <summary>
/// The broker's outermost middleware, for tests: tells when a web listener's request has been served completely
/// (its handler returned and everything it used is disposed), so a test waits for that event
/// instead of polling for its effects.
/// </summary>
public sealed class EndedRequests : IStartupFilter
{
    private readonly System.Threading.Channels.Channel<string> _paths = System.Threading.Channels.Channel.CreateUnbounded<string>();

    public Action<IApplicationBuilder> Configure(Action<IApplicationBuilder> next) => app =>
    {
        app.Use(async (http, inner) =>
        {
            try
            {
                await inner(http);
            }
            finally
            {
                // Only the web listener's: a long test makes many thousands of gRPC calls.
                if (WebListener.Carries(http))
                    _paths.Writer.TryWrite(http.Request.Path.Value ?? "");
            }
        });
        next(app);
    };

    /// <summary>Waits until a request to <paramref name="path"/> has ended; fails after <see cref="TestBroker.Timeout"/>.</summary>
    public async Task WaitForAsync(string path)
    {
        using var cts = new CancellationTokenSource(TestBroker.Timeout);
        while (await _paths.Reader.ReadAsync(cts.Token) != path)
        {
        }
    }
}

/// <summary>A watch stream read one event at a time, each wait bounded.</summary>
public sealed class Watcher : IAsyncDisposable
{
    private readonly CancellationTokenSource _cts = new();
    private readonly IAsyncEnumerator<WatchEvent> _events;

    public Watcher(BrokerClient client) => _events = client.WatchAsync(_cts.Token).GetAsyncEnumerator(_cts.Token);

    public ulong LastRevision { get; private set; }

    public async Task<WatchEvent> NextAsync()
    {
        Assert.True(await _events.MoveNextAsync().AsTask().WaitAsync(TestBroker.Timeout), "watch stream ended");
        var ev = _events.Current;
        if (LastRevision != 0 && ev.EventCase != WatchEvent.EventOneofCase.Snapshot)
            Assert.Equal(LastRevision + 1, ev.Revision);
        LastRevision = ev.Revision;
        return ev;
    }

    /// <summary>Reads until a group event matches; every revision on the way must follow the last.</summary>
    public async Task<Group> WaitForGroupAsync(Func<Group, bool> match)
    {
        while (true)
        {
            var ev = await NextAsync();
            if (ev.EventCase == WatchEvent.EventOneofCase.Group && match(ev.Group))
                return ev.Group;
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _cts.CancelAsync();
        try
        {
            await _events.DisposeAsync();
        }
        catch (Exception e) when (e is OperationCanceledException or BrokerException or RpcException)
        {
            // Cancelled on purpose.
        }
        _cts.Dispose();
    }
}

public static class Errors
{
    /// <summary>Asserts a call fails with the given errno and status code, never INTERNAL.</summary>
    public static async Task<BrokerException> Expect(Errno errno, StatusCode code, Func<Task> call)
    {
        var e = await Assert.ThrowsAnyAsync<BrokerException>(call);
        Assert.Equal((errno, code), (e.Errno, e.StatusCode));
        return e;
    }

    public static Task<T> Call<T>(Func<Task<T>> call) => BrokerException.Wrap(call);
}

/// <summary>
/// Tests that measure time or load the machine: they run one at a time, after the rest of the
/// suite, so neither their bounds nor the other tests' depend on what runs beside them.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class RunsAlone
{
    public const string Name = "runs alone";
}
